"""Settings from flags and SMOLLM2_* variables."""

from __future__ import annotations

import pytest

from server.settings import Settings, build_parser, parse_bytes


def test_flag_wins_over_env_and_env_over_default() -> None:
    env = {"SMOLLM2_PORT": "9001", "SMOLLM2_MAX_NUM_SEQS": "8", "SMOLLM2_ENABLE_PREFIX_CACHING": "off"}
    s = Settings.from_args(["--port", "9002"], env=env)
    assert s.port == 9002 and s.max_num_seqs == 8 and s.enable_prefix_caching is False
    assert s.max_waiting == 256 and s.served_model_name == "SmolLM2-135M-Instruct" and s.host == "127.0.0.1"


def test_a_true_false_flag_alone_means_true() -> None:
    s = Settings.from_args(["--disable-access-log", "--enable-prefix-caching", "false"], env={})
    assert s.disable_access_log is True and s.enable_prefix_caching is False
    s = Settings.from_args(["--protect-all", "--port", "9003"], env={"SMOLLM2_PROTECT_ALL": "false"})
    assert s.protect_all is True and s.port == 9003


def test_sizes_lists_and_bad_values() -> None:
    assert (
        parse_bytes("1GiB") == 2**30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes("4096") == 4096
    )
    s = Settings.from_args(["--kv-cache-memory", "2GiB", "--cors-origins", "http://a, http://b"], env={})
    assert s.kv_cache_memory == 2 * 2**30 and s.cors_origins == ["http://a", "http://b"]
    with pytest.raises(ValueError, match="size"):
        Settings.from_args(["--kv-cache-memory", "lots"], env={})
    with pytest.raises(ValueError, match="port"):
        Settings.from_args(["--port", "0"], env={})


def test_batch_invariant_from_env_and_only_in_bfloat16() -> None:
    assert Settings.from_args([], env={}).batch_invariant is False
    assert Settings.from_args([], env={"SMOLLM2_BATCH_INVARIANT": "true"}).batch_invariant is True
    assert Settings.from_args(["--batch-invariant", "on", "--dtype", "bfloat16"], env={}).batch_invariant
    with pytest.raises(ValueError, match="batch_invariant"):
        Settings.from_args(["--batch-invariant", "true", "--dtype", "float32"], env={})


def test_api_key_is_never_shown() -> None:
    s = Settings.from_args([], env={"SMOLLM2_API_KEY": "hunter2"})
    assert s.api_key == "hunter2"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)


def test_help_explains_every_setting() -> None:
    text = build_parser().format_help()
    for flag in [
        "--model",
        "--kv-cache-memory",
        "--max-waiting",
        "--api-key",
        "--max-body-bytes",
        "SMOLLM2_PORT",
    ]:
        assert flag in text


def test_threads_set_the_compute_threads_and_the_small_ops_follow() -> None:
    from server.core_setup import default_torch_threads

    s = Settings.from_args([], env={"SMOLLM2_THREADS": "6"})
    assert s.threads == 6 and default_torch_threads(s) == 5
    assert default_torch_threads(Settings.from_args(["--threads", "1"], env={})) == 1  # never 0
    with pytest.raises(ValueError, match="threads must be at least 1"):
        Settings.from_args(["--threads", "0"], env={})
