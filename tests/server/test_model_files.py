"""Start-up refuses settings and model files it cannot serve, with one line naming the flag, variable or
field and what is allowed, instead of starting a server that fails every request (or memory)."""

from __future__ import annotations

from typing import Any

import pytest

from server.core_setup import make_core
from server.settings import Settings
from tests.tiny import make_tiny_model


def refused(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ValueError) as info:
        Settings.from_args(argv, env=env or {})
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("size", ["0", "257", "100000", "1000000"])
def test_block_sizes_outside_1_to_256_are_refused(size: str) -> None:
    """A block of 100000 tokens was gigabytes of KV cache, and requests ran one at a time."""
    assert (
        refused(["--block-size", size]) == f"--block-size: block_size must be in [1, 256] tokens, got {size}"
    )


@pytest.mark.parametrize("size", ["1", "3", "7", "16", "65", "256"])
def test_block_sizes_up_to_256_odd_ones_included_are_accepted(size: str) -> None:
    assert Settings.from_args(["--block-size", size], env={}).block_size == int(size)


def test_a_context_below_two_tokens_and_an_empty_queue_are_refused() -> None:
    assert "--max-model-len: max_model_len must be at least 2" in refused(["--max-model-len", "1"])
    assert refused(["--max-waiting", "0"]) == "--max-waiting: max_waiting must be at least 1, got 0"
    message = refused([], {"SMOLLM2_MAX_WAITING": "0"})
    assert message == "SMOLLM2_MAX_WAITING: max_waiting must be at least 1, got 0"
    assert Settings.from_args(["--max-model-len", "2", "--max-waiting", "1"], env={}).max_waiting == 1


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {"SMOLLM2_MAX_NUM_SEQS": "abc"}, "SMOLLM2_MAX_NUM_SEQS 'abc': not an integer"),
        (["--port", "abc"], {}, "--port 'abc': not an integer"),
        (["--step-timeout", "soon"], {}, "--step-timeout 'soon': not a number"),
        (["--kv-cache-memory", "lots"], {}, "--kv-cache-memory 'lots': not a size: 'lots'"),
        ([], {"SMOLLM2_ENGINE_PROCESS": "maybe"}, "SMOLLM2_ENGINE_PROCESS 'maybe': not a boolean"),
        (["--port", "0"], {}, "--port: port must be in [1, 65535], got 0"),
        (["--log-level", "bogus"], {}, "--log-level: log_level must be one of debug, info, warning, error"),
        ([], {"SMOLLM2_LOG_LEVEL": "loud"}, "SMOLLM2_LOG_LEVEL: log_level must be one of"),
    ],
)
def test_bad_values_name_the_flag_or_the_variable_and_the_value(
    argv: list[str], env: dict[str, str], expected: str
) -> None:
    assert refused(argv, env).startswith(expected)


def test_a_flag_wins_over_a_bad_variable() -> None:
    assert Settings.from_args(["--port", "9000"], env={"SMOLLM2_PORT": "abc"}).port == 9000


def core_settings(**overrides: Any) -> Settings:
    return Settings(**{"kv_cache_memory": 4 * 1024 * 1024, "max_num_seqs": 4, **overrides})


def test_a_max_model_len_beyond_the_model_context_is_refused() -> None:
    model = make_tiny_model()  # max_position_embeddings 256
    with pytest.raises(ValueError, match=r"^--max-model-len 1000 is larger than the model's context "
                                         r"\(max_position_embeddings 256\): allowed 2 to 256$"):  # fmt: skip
        make_core(model, None, core_settings(max_model_len=1000))
    core = make_core(model, None, core_settings(max_model_len=256))
    assert core.scheduler.config.max_model_len == 256


@pytest.mark.parametrize(("max_model_len", "served"), [(None, 8192), (100, 100)])
def test_the_rope_table_is_sized_by_the_context_served(max_model_len: int | None, served: int) -> None:
    """Not by max_position_embeddings: 1e9 of them was a 512 GB table."""
    model = make_tiny_model(max_position_embeddings=1_000_000)
    core = make_core(model, None, core_settings(max_model_len=max_model_len))
    assert core.scheduler.config.max_model_len == served
    assert model.model.rotary_emb.cos_cached.shape[0] == served
