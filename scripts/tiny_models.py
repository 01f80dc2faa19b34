#!/usr/bin/env python3
"""Writes a tiny random-weight model with the default model's tokenizer, for the state-layout
tests of the architectures no small GGUF on the package registry covers: a hybrid (llama.cpp's
"jamba": Mamba layers and attention layers) and a purely recurrent one ("mamba"). The tests need
the state layout, not good text: the weights are random (seeded, so the file is the same bytes
every time).

usage: tiny_models.py jamba|mamba TOKENIZER_SOURCE.gguf OUT.gguf

Standard library only. jamba: four layers, Mamba, attention, Mamba, attention (a layer with no KV
heads is a Mamba layer), 4 query heads and 2 KV heads, a feed-forward block in each; mamba: two
Mamba layers and nothing else. Both: 64-wide embeddings, a 128-wide SSM with a 16-wide state and a
4-wide convolution; the token embedding in F16 (tied to the output), the rest in F32. Shapes are
those llama.cpp's loader asks of these architectures (src/models/jamba.cpp, mamba.cpp).
"""
import math
import random
import struct
import sys

N_EMBD, D_INNER, D_STATE, D_CONV, DT_RANK = 64, 128, 16, 4, 4
N_HEAD, N_HEAD_KV, N_FF, N_CTX = 4, 2, 128, 2048
# Per layer: True for attention, False for Mamba.
LAYERS = {"jamba": [False, True, False, True], "mamba": [False, False]}
ALIGN = 32
F32, F16 = 0, 1
U32, F32_KV, STRING, ARRAY = 4, 6, 8, 9


def read_tokenizer(path):
    """The raw bytes of every `tokenizer.*` key-value entry of a GGUF file, and the vocab size."""
    with open(path, "rb") as f:
        data = f.read(64 << 20)
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0]

    def string():
        nonlocal pos
        n = take("Q")
        s = data[pos:pos + n]
        pos += n
        return s.decode()

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_value(t):
        nonlocal pos
        if t == STRING:
            string()
        elif t == ARRAY:
            inner, n = take("I"), take("Q")
            if inner == STRING:
                for _ in range(n):
                    string()
            else:
                pos += sizes[inner] * n
        else:
            pos += sizes[t]

    if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] != 3:
        sys.exit(f"{path}: not a GGUF v3 file")
    pos = 8
    take("Q")
    n_kv = take("Q")
    entries, n_vocab = [], 0
    for _ in range(n_kv):
        start = pos
        key = string()
        t = take("I")
        if key == "tokenizer.ggml.tokens":
            n_vocab = struct.unpack_from("<Q", data, pos + 4)[0]
        skip_value(t)
        if key.startswith("tokenizer."):
            entries.append(data[start:pos])
    return entries, n_vocab


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, t, value):
    return gguf_string(key) + struct.pack("<I", t) + value


def tensors(arch, rng, n_vocab):
    """(name, ggml dims with ne0 first, ggml type, values) of every tensor."""
    normal = lambda sd, n: [rng.gauss(0.0, sd) for _ in range(n)]  # noqa: E731
    ones = lambda n: [1.0] * n  # noqa: E731
    out = [
        ("token_embd.weight", [N_EMBD, n_vocab], F16, normal(0.5, N_EMBD * n_vocab)),
        ("output_norm.weight", [N_EMBD], F32, ones(N_EMBD)),
    ]
    for i, attention in enumerate(LAYERS[arch]):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", [N_EMBD], F32, ones(N_EMBD)))
        if attention:
            gqa = N_EMBD // N_HEAD * N_HEAD_KV
            for name, rows in [("attn_q", N_EMBD), ("attn_k", gqa), ("attn_v", gqa), ("attn_output", N_EMBD)]:
                out.append((b + name + ".weight", [N_EMBD, rows], F32, normal(0.02, N_EMBD * rows)))
        else:
            dt = [math.exp(rng.uniform(math.log(1e-3), math.log(1e-1))) for _ in range(D_INNER)]
            out += [
                (b + "ssm_in.weight", [N_EMBD, 2 * D_INNER], F32, normal(0.1, N_EMBD * 2 * D_INNER)),
                (b + "ssm_conv1d.weight", [D_CONV, D_INNER], F32, normal(0.3, D_CONV * D_INNER)),
                (b + "ssm_conv1d.bias", [D_INNER], F32, normal(0.02, D_INNER)),
                (b + "ssm_x.weight", [D_INNER, DT_RANK + 2 * D_STATE], F32,
                 normal(0.1, D_INNER * (DT_RANK + 2 * D_STATE))),
                (b + "ssm_dt.weight", [DT_RANK, D_INNER], F32, normal(0.02, DT_RANK * D_INNER)),
                # The inverse softplus of a time step between 1e-3 and 1e-1, as Mamba initialises it.
                (b + "ssm_dt.bias", [D_INNER], F32, [d + math.log(-math.expm1(-d)) for d in dt]),
                # A = -exp(A_log) with A_log = log(1..d_state), as the converter stores it.
                (b + "ssm_a", [D_STATE, D_INNER], F32, [-(j % D_STATE + 1.0) for j in range(D_STATE * D_INNER)]),
                (b + "ssm_d", [D_INNER], F32, ones(D_INNER)),
                (b + "ssm_out.weight", [D_INNER, N_EMBD], F32, normal(0.1, D_INNER * N_EMBD)),
            ]
        if arch == "mamba":
            continue
        if not attention:
            out += [
                (b + "ssm_dt_norm.weight", [DT_RANK], F32, ones(DT_RANK)),
                (b + "ssm_b_norm.weight", [D_STATE], F32, ones(D_STATE)),
                (b + "ssm_c_norm.weight", [D_STATE], F32, ones(D_STATE)),
            ]
        out += [
            (b + "ffn_norm.weight", [N_EMBD], F32, ones(N_EMBD)),
            (b + "ffn_gate.weight", [N_EMBD, N_FF], F32, normal(0.02, N_EMBD * N_FF)),
            (b + "ffn_up.weight", [N_EMBD, N_FF], F32, normal(0.02, N_EMBD * N_FF)),
            (b + "ffn_down.weight", [N_FF, N_EMBD], F32, normal(0.02, N_FF * N_EMBD)),
        ]
    return out


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in LAYERS:
        sys.exit(__doc__)
    arch, source, dest = sys.argv[1:]
    layers = LAYERS[arch]
    tokenizer, n_vocab = read_tokenizer(source)
    u32 = lambda v: struct.pack("<I", v)  # noqa: E731
    meta = [
        kv("general.architecture", STRING, gguf_string(arch)),
        kv("general.name", STRING, gguf_string(f"tiny-random-{arch}")),
        kv("general.file_type", U32, u32(1)),
        kv(f"{arch}.context_length", U32, u32(N_CTX)),
        kv(f"{arch}.embedding_length", U32, u32(N_EMBD)),
        kv(f"{arch}.block_count", U32, u32(len(layers))),
        kv(f"{arch}.attention.layer_norm_rms_epsilon", F32_KV, struct.pack("<f", 1e-5)),
        kv(f"{arch}.ssm.conv_kernel", U32, u32(D_CONV)),
        kv(f"{arch}.ssm.inner_size", U32, u32(D_INNER)),
        kv(f"{arch}.ssm.state_size", U32, u32(D_STATE)),
        kv(f"{arch}.ssm.time_step_rank", U32, u32(DT_RANK)),
    ]
    if arch == "jamba":
        heads_kv = b"".join(u32(N_HEAD_KV if a else 0) for a in layers)
        meta += [
            kv(f"{arch}.feed_forward_length", U32, u32(N_FF)),
            kv(f"{arch}.attention.head_count", U32, u32(N_HEAD)),
            kv(f"{arch}.attention.head_count_kv", ARRAY, struct.pack("<IQ", U32, len(layers)) + heads_kv),
        ]
    else:
        meta += [
            kv(f"{arch}.feed_forward_length", U32, u32(0)),
            kv(f"{arch}.attention.head_count", U32, u32(0)),
        ]
    meta += tokenizer
    all_tensors = tensors(arch, random.Random(1234), n_vocab)
    infos, blobs, offset = [], [], 0
    for name, dims, ggml_type, values in all_tensors:
        blob = struct.pack(f"<{len(values)}{'e' if ggml_type == F16 else 'f'}", *values)
        infos.append(gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", ggml_type, offset))
        padded = blob + b"\0" * (-len(blob) % ALIGN)
        blobs.append(padded)
        offset += len(padded)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(all_tensors), len(meta)) + b"".join(meta) + b"".join(infos)
    head += b"\0" * (-len(head) % ALIGN)
    with open(dest, "wb") as f:
        f.write(head)
        for b in blobs:
            f.write(b)
    print(f"wrote {dest}: {len(all_tensors)} tensors, vocabulary {n_vocab}")


if __name__ == "__main__":
    main()
