"""The tools' one command-line library (dvp_jax/cli.py): flags of their own per tool, --help
exits 0, a bad flag or a user error is one `error:` line and exit code 2."""
import pytest
from absl import flags

from dvp_jax import benchmark, cli, convert_torch, errors, report
from dvp_jax.input import throughput as input_throughput
from dvp_jax.input import vipriors
from dvp_jax.models import throughput as model_throughput


def _flags():
    fv = flags.FlagValues()
    flags.DEFINE_integer("batch", 64, "Global batch.", flag_values=fv)
    flags.DEFINE_boolean("copy", False, "Copy.", flag_values=fv)
    cli.define_verbosity(fv)
    return fv


def test_every_tool_has_flags_of_its_own():
    tools = [benchmark, convert_torch, report, vipriors, input_throughput, model_throughput]
    assert len({id(t.FLAGS) for t in tools}) == len(tools)
    assert all(t.FLAGS is not flags.FLAGS for t in tools)
    assert "verbosity" in benchmark.FLAGS and "verbosity" in convert_torch.FLAGS


def test_parse_values_positionals_and_defaults_on_reparse():
    fv = _flags()
    args = cli.parse(fv, ["a", "--batch", "8", "b", "--copy", "-v", "1"], prog="p", doc="",
                     positional="X...", max_positional=None)
    assert vars(args) == {"batch": 8, "copy": True, "verbosity": 1, "positional": ["a", "b"]}
    args = cli.parse(fv, [], prog="p", doc="")  # A second parse starts from the defaults.
    assert (args.batch, args.copy, args.verbosity, args.positional) == (64, False, None, [])


def test_help_prints_usage_doc_and_flags_and_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(_flags(), ["--batch", "3", "--help"], prog="python -m tool", doc="The doc.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m tool [flags]\n\nThe doc.\n\nflags:\n")
    assert "--batch: Global batch." in out and ".py:" not in out


@pytest.mark.parametrize("argv, message", [
    (["--nope"], "Unknown command line flag 'nope'"),
    (["--batch", "x"], "flag --batch=x"),
    (["extra"], "expected no positional arguments, got ['extra']"),
])
def test_bad_command_line_is_one_error_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.parse(_flags(), argv, prog="p", doc="")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_run_prints_user_errors_in_one_line_and_keeps_bugs(capsys):
    def user_mistake():
        raise errors.ConfigError("lr must be > 0")

    assert cli.run(user_mistake) == 2
    assert capsys.readouterr().err == "error: lr must be > 0\n"
    assert cli.run(lambda: 3) == 3 and cli.run(lambda: [1]) == 0
    with pytest.raises(ZeroDivisionError):
        cli.run(lambda: 1 / 0)


def test_report_missing_file_and_missing_argument(tmp_path, capsys):
    assert report.main([str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.startswith("error: [Errno 2] No such file or directory")
    with pytest.raises(SystemExit) as e:
        report.main([])
    assert e.value.code == 2
    assert issubclass(report.ReportError, errors.UserError)


def test_benchmark_refuses_an_unknown_kind(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["nope"])
    assert e.value.code == 2 and "unknown kind(s) ['nope']" in capsys.readouterr().err
