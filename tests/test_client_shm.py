"""The shared-memory transport through real servers: the same latents as HTTP and as the local
transformer, unchanged inputs really not rewritten (and changed ones really rewritten), regions
cleaned up, server errors carried."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import tritonclient.http as httpclient
from helpers import TEXT_TOKENS, embeds, generate, step_call

from flux_triton.client.connection import RemoteDitError
from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.shm import KEY_PREFIX

pytestmark = pytest.mark.server

EMBEDDINGS = ("encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids")
PER_STEP = {"hidden_states", "timestep"}


def shm_entries(prefix: str = KEY_PREFIX) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix))


def server_regions(url: str) -> list[str]:
    client = httpclient.InferenceServerClient(url)
    try:
        return sorted(r["name"] for r in client.get_system_shared_memory_status())
    finally:
        client.close()


def left_behind(regions: list[tuple[str, str]], url: str) -> list[str]:
    """Of a transport's regions (name, key), those still in /dev/shm or registered with the server."""
    registered, files = set(server_regions(url)), set(shm_entries())
    return [name for name, key in regions if name in registered or key.lstrip("/") in files]


@pytest.fixture(scope="module", autouse=True)
def no_leaks():
    before = set(shm_entries())
    yield
    assert set(shm_entries()) == before, "shared-memory regions left in /dev/shm"


def written_sets(remote: RemoteFluxTransformer, since: int) -> list[set[str]]:
    return [set(entry) for entry in remote.transport.written[since:]]


def test_schnell_4_steps_shm_equals_http_and_local(public_schnell, tiny_schnell):
    url, model = public_schnell.server.url, public_schnell.model
    size = 64 if model == "dit_transformer" else 256  # the engine's profiles start at 256 image tokens
    kwargs = dict(num_inference_steps=4, size=size, **embeds(1))
    with RemoteFluxTransformer(url=url, model_name=model, transport="shm") as over_shm:
        served = generate(over_shm, "schnell", seed=1, **kwargs)
        regions = over_shm.transport.regions
        assert written_sets(over_shm, 0) == [set(over_shm.transport.written[0]), PER_STEP, PER_STEP, PER_STEP]
        assert set(over_shm.transport.written[0]) == PER_STEP | set(EMBEDDINGS)
    with RemoteFluxTransformer(url=url, model_name=model) as over_http:
        assert over_http.settings.transport == "http"
        expected_http = generate(over_http, "schnell", seed=1, **kwargs)
    local = generate(tiny_schnell, "schnell", seed=1, **kwargs)
    assert torch.equal(served, expected_http)
    if model == "dit_transformer":
        assert torch.equal(served, local)
    else:  # ONNX Runtime engine: close, not bitwise (test_flux_dit_parity)
        torch.testing.assert_close(served, local, rtol=1e-4, atol=1e-4)
    assert regions and not left_behind(regions, url)


def test_dev_28_steps_embeddings_written_once_per_generation(dev_server, tiny_dev):
    with RemoteFluxTransformer(url=dev_server.url, transport="shm") as remote:
        first = embeds(2)
        served = generate(remote, "dev", seed=2, num_inference_steps=28, guidance_scale=3.5, **first)
        assert torch.equal(
            served, generate(tiny_dev, "dev", seed=2, num_inference_steps=28, guidance_scale=3.5, **first)
        )
        sets = written_sets(remote, 0)
        assert sets[0] == PER_STEP | set(EMBEDDINGS) | {"guidance"}
        assert sets[1:] == [PER_STEP] * 27
        sizes = remote.transport.written[0]
        assert sizes["encoder_hidden_states"] == TEXT_TOKENS * 32 * 4
        # Another prompt with the same shapes: its embeddings are written (once), and they are used.
        calls = len(remote.transport.written)
        second = embeds(3)
        served = generate(remote, "dev", seed=2, num_inference_steps=28, guidance_scale=3.5, **second)
        expected = generate(tiny_dev, "dev", seed=2, num_inference_steps=28, guidance_scale=3.5, **second)
        assert torch.equal(served, expected)
        sets = written_sets(remote, calls)
        assert sets[0] == PER_STEP | {"encoder_hidden_states", "pooled_projections"}  # same ids, same guidance
        assert sets[1:] == [PER_STEP] * 27
        # Another guidance scale is written too.
        calls = len(remote.transport.written)
        generate(remote, "dev", seed=2, num_inference_steps=2, guidance_scale=7.0, **second)
        assert "guidance" in written_sets(remote, calls)[0]


def test_in_place_changes_and_equal_copies(dev_server, tiny_dev):
    text = torch.randn(1, TEXT_TOKENS, 32, generator=torch.Generator().manual_seed(5))
    with RemoteFluxTransformer(url=dev_server.url, transport="shm") as remote:
        call = step_call(text)
        (first,) = remote(**call)
        assert "encoder_hidden_states" in remote.transport.written[-1]
        text.mul_(2)  # the same tensor object, changed in place: must be rewritten
        (second,) = remote(**call)
        assert "encoder_hidden_states" in remote.transport.written[-1]
        (local,) = tiny_dev(**call)
        assert torch.equal(second, local) and not torch.equal(first, second)
        # An equal copy (another object) is compared, found equal and not rewritten.
        (third,) = remote(**{**call, "encoder_hidden_states": text.clone()})
        assert "encoder_hidden_states" not in remote.transport.written[-1]
        assert torch.equal(third, local)
        # Bitwise, not by value: -0.0 == 0.0, yet it is another input.
        zeros = torch.zeros(1, TEXT_TOKENS, 32)
        remote(**{**call, "encoder_hidden_states": zeros})
        remote(**{**call, "encoder_hidden_states": -zeros})
        assert "encoder_hidden_states" in remote.transport.written[-1]
        # A longer prompt gets a larger region; the shorter one after it is rewritten.
        longer = torch.randn(1, 2 * TEXT_TOKENS, 32)
        (long_pred,) = remote(**step_call(longer))
        assert torch.equal(long_pred, tiny_dev(**step_call(longer))[0])
        (again,) = remote(**call)
        assert "encoder_hidden_states" in remote.transport.written[-1] and torch.equal(again, local)


def test_true_cfg_keeps_both_prompts_in_place(dev_server, tiny_dev):
    negative = embeds(7)
    kwargs = dict(
        num_inference_steps=6,
        true_cfg_scale=4.0,
        negative_prompt_embeds=negative["prompt_embeds"],
        negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"],
        **embeds(6),
    )
    with RemoteFluxTransformer(url=dev_server.url, transport="shm") as remote:
        served = generate(remote, "dev", seed=6, **kwargs)
        sets = written_sets(remote, 0)
    assert torch.equal(served, generate(tiny_dev, "dev", seed=6, **kwargs))
    assert len(sets) == 12
    assert sets[0] == sets[1] == PER_STEP | set(EMBEDDINGS) | {"guidance"}  # "cond", then "uncond"
    assert sets[2:] == [PER_STEP] * 10


def test_server_errors_carry_the_servers_message_over_shm(dev_server):
    with RemoteFluxTransformer(url=dev_server.url, transport="shm") as remote:
        too_long = step_call(torch.randn(1, 513, 32))
        with pytest.raises(RemoteDitError, match=r"dit_transformer.*S=513 exceeds this server's limit of 512"):
            remote(**too_long)
        nan = step_call(torch.full((1, TEXT_TOKENS, 32), float("nan")))
        with pytest.raises(RemoteDitError, match="encoder_hidden_states: expected finite values, got NaN or Inf"):
            remote(**nan)
        (noise_pred,) = remote(**step_call(torch.randn(1, TEXT_TOKENS, 32)))
        assert noise_pred.shape == (1, 16, 4) and torch.isfinite(noise_pred).all()


def test_regions_are_released_on_close_on_collection_and_at_exit(dev_server):
    import gc
    import subprocess
    import sys

    remote = RemoteFluxTransformer(url=dev_server.url, transport="shm")
    remote(**step_call(torch.randn(1, TEXT_TOKENS, 32)))
    regions = remote.transport.regions
    assert len(regions) == 8 and len(left_behind(regions, dev_server.url)) == 8  # 7 inputs and noise_pred
    remote.close()
    remote.close()  # idempotent
    assert not left_behind(regions, dev_server.url)
    with pytest.raises(RemoteDitError, match="transport is closed"):
        remote(**step_call(torch.randn(1, TEXT_TOKENS, 32)))

    dropped = RemoteFluxTransformer(url=dev_server.url, transport="shm")
    dropped(**step_call(torch.randn(1, TEXT_TOKENS, 32)))
    regions = dropped.transport.regions
    del dropped
    gc.collect()
    assert not left_behind(regions, dev_server.url)

    script = (
        "import torch\n"
        "from flux_triton.client.remote import RemoteFluxTransformer\n"
        f"r = RemoteFluxTransformer(url={dev_server.url!r}, transport='shm')\n"
        "r(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 8, 32), "
        "pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), "
        "txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))\n"
        "import json; print(json.dumps(r.transport.regions))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    regions = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(regions) == 8 and not left_behind(regions, dev_server.url)
    assert "leaked shared_memory" not in done.stderr


def test_the_transport_setting_is_checked():
    with pytest.raises(ValueError, match="transport: expected one of http, shm, got 'grpc'"):
        RemoteFluxTransformer(url="127.0.0.1:1", transport="grpc")


def test_region_files_name_this_process_and_hide_the_server_names(dev_server):
    """A listing of /dev/shm shows whose files they are, not the names the server knows the regions by (another
    client would need those to read or write them through an inference)."""
    with RemoteFluxTransformer(url=dev_server.url, transport="shm") as remote:
        remote(**step_call(torch.randn(1, TEXT_TOKENS, 32)))
        for name, key in remote.transport.regions:
            assert (
                key.startswith(f"/{KEY_PREFIX}{os.getpid()}_") and len(key) > len(f"/{KEY_PREFIX}{os.getpid()}_") + 30
            )
            # checked by shape, not by "pid not in name": a random secret may hold the pid's digits
            secret = name.removeprefix(KEY_PREFIX)
            assert name.startswith(KEY_PREFIX) and re.fullmatch("[0-9a-f]{32}", secret) and secret not in key


def test_cli_transport_shm_matches_http(dev_server, tmp_path, capsys):
    from safetensors.torch import load_file

    from flux_triton.client.cli import main

    argv = ["--url", dev_server.url, "--random-embeds", "--text-tokens", "8", "--steps", "3", "--true-cfg", "4"]
    argv += ["--height", "32", "--width", "32", "--seed", "4"]
    assert main([*argv, "--output", str(tmp_path / "http.safetensors")]) == 0
    assert "transport='http'" in capsys.readouterr().out
    assert main([*argv, "--transport", "shm", "--output", str(tmp_path / "shm.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "transport='shm'" in out and out.count("ms (server calls") == 3
    assert torch.equal(
        load_file(tmp_path / "shm.safetensors")["latents"], load_file(tmp_path / "http.safetensors")["latents"]
    )


def test_bf16_server_fp32_pipeline(tmp_path, model_root):
    """A BF16 model: the fp32 pipeline's embeddings become new BF16 tensors every call, so they are
    compared by content (equal: not rewritten); the results are bitwise those of HTTP."""
    from helpers import start_server

    parameters = {"dit_transformer": {"dtype": "bfloat16"}}
    server = start_server(tmp_path, model_root, ["dit_transformer"], parameters=parameters)
    try:
        with (
            RemoteFluxTransformer(url=server.url, transport="shm") as over_shm,
            RemoteFluxTransformer(url=server.url) as over_http,
        ):
            assert over_shm.dtype == torch.bfloat16
            kwargs = dict(num_inference_steps=4, guidance_scale=3.5, **embeds(8))
            served = generate(over_shm, "dev", seed=8, **kwargs)
            assert torch.equal(served, generate(over_http, "dev", seed=8, **kwargs))
            sets = written_sets(over_shm, 0)
            assert sets[0] == PER_STEP | set(EMBEDDINGS) | {"guidance"} and sets[1:] == [PER_STEP] * 3
            assert over_shm.transport.written[0]["encoder_hidden_states"] == TEXT_TOKENS * 32 * 2
            call = step_call(torch.randn(1, TEXT_TOKENS, 32).bfloat16())
            call = {k: v.bfloat16() if k != "return_dict" and v.is_floating_point() else v for k, v in call.items()}
            (shm_pred,) = over_shm(**call)
            (http_pred,) = over_http(**call)
            assert shm_pred.dtype == torch.bfloat16 and torch.equal(shm_pred, http_pred)
    finally:
        server.stop()


def test_regions_the_server_lost_are_registered_again(dev_server, tiny_dev):
    """An unregister (or a restarted server) leaves the transport's regions unknown to the server: the
    next call registers them again and is answered, with the embeddings still not rewritten."""
    kwargs = dict(num_inference_steps=4, guidance_scale=3.5, **embeds(9))
    with RemoteFluxTransformer(url=dev_server.url, transport="shm") as remote:
        first = generate(remote, "dev", seed=9, **kwargs)
        with httpclient.InferenceServerClient(dev_server.url) as other:
            other.unregister_system_shared_memory()  # every region of every client
        assert not {name for name, _ in remote.transport.regions} & set(server_regions(dev_server.url))
        calls = len(remote.transport.written)
        again = generate(remote, "dev", seed=9, **kwargs)
        assert remote.transport.reregistered == 1
        assert written_sets(remote, calls) == [PER_STEP] * 4  # the regions kept their contents
        assert {name for name, _ in remote.transport.regions} <= set(server_regions(dev_server.url))
        assert len(remote.transport.regions) == 8
    assert torch.equal(first, again)
    assert torch.equal(again, generate(tiny_dev, "dev", seed=9, **kwargs))


def test_a_region_altered_behind_the_transports_back_is_repaired_at_the_next_generation(dev_server, tiny_dev):
    """Another local process writes into the prompt-embedding region: the next generation starts by
    comparing the held inputs with their regions, rewrites it and is answered as diffusers answers."""
    kwargs = dict(num_inference_steps=4, guidance_scale=3.5, **embeds(11))
    with RemoteFluxTransformer(url=dev_server.url, transport="shm") as remote:
        first = generate(remote, "dev", seed=11, **kwargs)
        (slot,) = [slot for key, slot in remote.transport._slots.items() if key[1] == "encoder_hidden_states"]
        with open(f"/dev/shm{slot.region.key}", "r+b") as region:
            region.write(torch.randn(slot.region.capacity // 4).numpy().tobytes())
        calls = len(remote.transport.written)
        again = generate(remote, "dev", seed=11, **kwargs)
        assert remote.transport.repaired == 1
        assert written_sets(remote, calls) == [PER_STEP | {"encoder_hidden_states"}] + [PER_STEP] * 3
    assert torch.equal(first, again)
    assert torch.equal(again, generate(tiny_dev, "dev", seed=11, **kwargs))
