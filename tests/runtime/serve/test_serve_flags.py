"""Bad data-parallel and KV-transfer flags end ``python -m runtime.serve`` with one line and exit code 2, before
any model is loaded or any process started."""
import pytest

from runtime.serve.__main__ import main


@pytest.mark.parametrize("argv,message", [
    (["--headless", "--data-parallel-size", "2"], "--headless needs --data-parallel-rpc-port"),
    (["--headless", "--data-parallel-size", "2", "--data-parallel-start-rank", "1", "--data-parallel-size-local", "1"],
     "need a known port: pass --data-parallel-rpc-port"),
    (["--headless", "--data-parallel-size", "2", "--data-parallel-size-local", "0", "--data-parallel-rpc-port", "1"],
     "no engine cores to run"),
    (["--data-parallel-size", "2", "--data-parallel-size-local", "1"], "need a known port"),
    (["--data-parallel-size", "2", "--data-parallel-start-rank", "1", "--data-parallel-size-local", "1",
      "--data-parallel-rpc-port", "1"], "the server's host runs data-parallel rank 0"),
    (["--data-parallel-size", "2", "--data-parallel-size-local", "3"], "outside data_parallel_size=2"),
    (["--data-parallel-size", "2", "--data-parallel-size-local", "-1"], "must be >= 0"),
    (["--api-server-count", "0", "--data-parallel-size", "2"], "API server count must be >= 1"),
])
def test_a_bad_data_parallel_flag_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("config,message", [
    ("{not json", "not valid JSON"),
    ('{"kv_role": "prefill"}', "kv_role must be one of"),
    ('{"kv_role": "kv_producer", "kv_port": 99999}', "kv_port must be a TCP port"),
])
def test_a_bad_kv_transfer_config_is_one_line(config, message, capsys):
    assert main(["--port", "0", "--kv-transfer-config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
