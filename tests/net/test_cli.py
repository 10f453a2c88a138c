"""``veil worker`` and ``veil token`` from the command line."""

from __future__ import annotations

import os

import pytest
import torch

import veil
from veil.cli import main
from veil.net import connect, read_token
from veil.net._data import load_csv, parse_data_arg

pytestmark = pytest.mark.network


def test_help_lists_the_worker_command(capsys):
    assert main(["--help"]) == 0
    assert "worker" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--token-file", "--tls-cert", "--data", "--allow", "--max-frame", "--port"):
        assert flag in out


def test_bad_arguments_fail_with_a_message(tmp_path, capsys):
    assert main(["worker", "--name", "x", "--tls-cert", "c.pem"]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["worker", "--name", "x", "--host", "0.0.0.0"]) == 2
    assert "without a token" in capsys.readouterr().err
    assert main(["worker", "--name", "x", "--data", f"t={tmp_path / 'missing.csv'}"]) == 2
    assert "cannot read" in capsys.readouterr().err
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    assert main(["worker", "--name", "x", "--token-file", str(short)]) == 2
    assert "at least 16" in capsys.readouterr().err


def test_token_command(tmp_path, capsys):
    assert main(["token"]) == 0
    assert len(capsys.readouterr().out.strip()) >= 40
    f = tmp_path / "alice.token"
    assert main(["token", str(f)]) == 0
    assert len(read_token(f)) >= 40 and (os.stat(f).st_mode & 0o777) == 0o600
    assert main(["token", str(f)]) == 1  # never overwrites


def test_csv_loading(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("x, y\n1, 2\n3, 4.5\n")
    data = load_csv("a", f)
    assert torch.equal(data.tensor, torch.tensor([[1.0, 2.0], [3.0, 4.5]]))
    assert data.tags == ("#a",) and "(x, y)" in data.description
    f.write_text("1 2\n3 4\n")
    assert load_csv("a", f).tensor.shape == (2, 2)
    f.write_text("1,2\n3\n")
    with pytest.raises(ValueError, match="line 2"):
        load_csv("a", f)
    f.write_text("1,2\n3,x\n")
    with pytest.raises(ValueError, match="not numeric"):
        load_csv("a", f)
    assert parse_data_arg("boston=/d/housing.csv")[0] == "boston"
    for bad in ("boston", "=x.csv", "a b=x.csv"):
        with pytest.raises(ValueError):
            parse_data_arg(bad)


def test_a_worker_hosts_the_boston_table(spawn):
    data_dir = os.environ["VEIL_DATA_DIR"]
    proc = spawn("alice", args=["--data", f"boston={data_dir}/housing.csv", "--allow", "me"])
    local = load_csv("boston", f"{data_dir}/housing.csv").tensor
    with connect(proc.url, token=proc.token, timeout=10) as alice:
        (table,) = alice.search("#boston")
        assert table.shape == (506, 14)
        assert table[:, 13].mean().item() == pytest.approx(local[:, 13].mean().item())
        with connect(proc.url, token=proc.token, timeout=10, name="mallory") as other:
            (theirs,) = other.search("#boston")
            with pytest.raises(veil.PermissionDenied, match="'mallory' may not take"):
                theirs[:, 13].mean().item()
    log = proc.log()
    assert "hosting housing.csv: 506 rows x 14 columns as #boston (private, allowed: me)" in log


def test_local_workers_start_connect_and_stop():
    with veil.net.local_workers("alice", "bob", args=["--max-objects", "100"]) as (alice, bob):
        assert (alice.name, bob.name) == ("alice", "bob")
        moved = (torch.ones(3).send(alice) * 2).move(bob)
        assert moved.get().tolist() == [2.0, 2.0, 2.0]
        assert alice.limits["max_objects"] == 100
    assert not alice._conn.open and not bob._conn.open
    with pytest.raises(veil.WorkerUnavailable):
        alice.flush()
    with pytest.raises(ValueError, match="at least one"), veil.net.local_workers():
        pass
