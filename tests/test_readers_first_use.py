"""First-use mistakes (issue 12): misspelt reader options, empty sources, a psp that lacks an
element of the source, messages.  Every check here runs before any cluster starts."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from helpers import SAMPLES

from gmp_pipeline.cli import main
from gmp_pipeline.errors import InputError
from gmp_pipeline.readers import open_reader

MD17 = SAMPLES / "md17" / "ethanol.npz"


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# -- unknown reader options ---------------------------------------------------------------------

def test_unknown_reader_option_is_refused_with_the_valid_ones():
    with pytest.raises(InputError) as exc:
        open_reader("md17", MD17, bogus=3)
    msg = str(exc.value)
    assert "'bogus'" in msg and "md17" in msg
    assert "energy_unit, molecule, skip_bad_records" in msg


def test_misspelt_reader_option_suggests_the_close_match():
    with pytest.raises(InputError, match=r"did you mean 'energy_unit'"):
        open_reader("md17", MD17, energy_units="eV")
    with pytest.raises(InputError, match=r"'energy_keys'.*did you mean 'energy_key'"):
        open_reader("qm9", SAMPLES / "qm9", energy_keys="U")
    # the options each reader really has are still accepted
    assert open_reader("md17", MD17, energy_unit="eV").units["energy"] == "eV"
    assert len(open_reader("qm9", SAMPLES / "qm9", energy_key="H")) == 20


def test_ocp_lists_the_options_of_the_detected_format():
    with pytest.raises(InputError) as exc:
        open_reader("ocp", SAMPLES / "oc20_lmdb" / "pyg2_is2re_style", energy_target="total")
    msg = str(exc.value)
    assert "'energy_target'" in msg and "energy_key" in msg and "LMDB" in msg


@pytest.mark.parametrize("option", ["foo=1", "energy_units=eV"])
def test_cli_unknown_reader_option_is_one_clean_error(tmp_path, option):
    res = run_cli("featurize", "md17", MD17, "-o", tmp_path / "x.zarr", "--reader-option",
                  option, "--no-progress")
    assert res.exit_code == 1
    assert "Error: unknown reader option" in res.output and option.split("=")[0] in res.output
    assert "valid options: energy_unit, molecule, skip_bad_records" in res.output
    assert "Traceback" not in res.output and "dashboard" not in res.output
    assert not (tmp_path / "x.zarr").exists()
