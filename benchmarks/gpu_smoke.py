"""CUDA-graph decoding equals eager decoding and vanilla greedy (fp32, tiny random model and the embedded one)."""

import sys

sys.path.insert(0, "tests")
from conftest import FakeTokenizer, random_heads, tiny_llama  # noqa: E402

from medusa_llama.decode.backbone import make_backbone  # noqa: E402
from medusa_llama.decode.decoder import GenerationConfig, MedusaDecoder, VanillaDecoder  # noqa: E402
from medusa_llama.decode.tree import BUILTIN_TREE_NAMES, builtin_tree  # noqa: E402

cfg = GenerationConfig(max_new_tokens=64, stop_at_eos=False)
bb = make_backbone(tiny_llama().cuda(), FakeTokenizer(), "tiny", 512)
ok = True
for graphs in (False, True):
    ref = VanillaDecoder(bb, use_cuda_graphs=graphs).generate([1, 2, 3, 4, 5], cfg).tokens
    for kind in ("medusa", "sequential"):
        for name in BUILTIN_TREE_NAMES:
            dec = MedusaDecoder(bb, random_heads(kind), builtin_tree(name), use_cuda_graphs=graphs)
            for _ in range(2):
                out = dec.generate([1, 2, 3, 4, 5], cfg)
                ok &= out.tokens == ref
            print("graphs", graphs, kind, name, out.tokens == ref, round(out.mean_accepted, 2))
    sampled = MedusaDecoder(bb, random_heads(), builtin_tree("tree64"), use_cuda_graphs=graphs).generate(
        [1, 2, 3], GenerationConfig(max_new_tokens=32, temperature=0.8, seed=0, stop_at_eos=False)
    )
    print("sampling ok", len(sampled.tokens))
print("ALL_EQUAL", ok)

# bf16 on the embedded model: compiled steps against eager ones
from medusa_llama.decode.heads import HeadsConfig, MedusaHeads  # noqa: E402
from medusa_llama.pipeline import load_pipeline_backbone  # noqa: E402

bb = load_pipeline_backbone(None, "cuda", "bfloat16", 2048)
ids = bb.tokenizer.apply_chat_template(
    [{"role": "user", "content": "Write a short poem about the sea."}], add_generation_prompt=True, tokenize=True
)
ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
cfg = GenerationConfig(max_new_tokens=96)
identity_heads = MedusaHeads(HeadsConfig(hidden_size=576, vocab_size=49152, base_model=bb.name))
outs = {"vanilla": VanillaDecoder(bb).generate(ids, cfg).tokens}
outs["medusa"] = MedusaDecoder(bb, identity_heads, builtin_tree("tree64")).generate(ids, cfg).tokens
outs["vanilla_compiled"] = VanillaDecoder(bb, compile=True).generate(ids, cfg).tokens
outs["medusa_compiled"] = (
    MedusaDecoder(bb, identity_heads, builtin_tree("tree64"), compile=True).generate(ids, cfg).tokens
)
for k, v in outs.items():
    same = sum(a == b for a, b in zip(v, outs["vanilla"], strict=False))
    print(k, "agrees with vanilla on", same, "of", len(outs["vanilla"]), "tokens")
print(bb.tokenizer.decode(outs["vanilla"]))
