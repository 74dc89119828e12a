"""Compiled decoding (StaticKVCache + torch.compile'd step) gives the tokens eager decoding gives."""
import torch
import torch._dynamo

from conftest import varied_model
from model.model_lora import apply_lora, merge_lora, set_adapter, unmerge_lora
from model.model_minimind import STATIC_BUCKET, StaticKVCache, static_len


def compiles() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def greedy(model, ids, n=24, **kw):
    return model.generate(ids, max_new_tokens=n, eos_token_id=-1, **kw)


def test_static_cache_forward_equals_dynamic_cache():
    # Eager, no compiler: the static cache's masks and positions alone must reproduce the dynamic cache's logits.
    model = varied_model(3)
    ids = torch.randint(5, 3800, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded: its 5 real tokens must decode as if alone
    with torch.inference_mode():
        cache = StaticKVCache(model.config, 2, 64, start=(mask == 0).sum(-1))
        got = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        want = [model(ids[:1]).logits[:, -1], model(ids[1:, 4:]).logits[:, -1]]
        nxt = got[0].argmax(-1, keepdim=True)
        got.append(model(nxt, past_key_values=cache, use_cache=True).logits[:, -1])
        want += [model(torch.cat([ids[:1], nxt[:1]], 1)).logits[:, -1],
                 model(torch.cat([ids[1:, 4:], nxt[1:]], 1)).logits[:, -1]]
    assert cache.length.tolist() == [10, 10]
    torch.testing.assert_close(got[0], torch.cat(want[:2]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], torch.cat(want[2:]), atol=1e-4, rtol=1e-4)
    assert static_len(10, model.config) == STATIC_BUCKET and static_len(STATIC_BUCKET + 1, model.config) == 2 * STATIC_BUCKET


def test_compiled_greedy_equals_eager_and_compiles_once_per_bucket():
    model = varied_model(4)
    g = torch.Generator().manual_seed(1)
    one, other = torch.randint(5, 3800, (1, 11), generator=g), torch.randint(5, 3800, (1, 30), generator=g)
    eager = greedy(model, one)
    assert len(set(eager[0, 11:].tolist())) > 5  # varied text, not one repeated token
    assert torch.equal(greedy(model, one, compile=True), eager)
    before = compiles()
    assert before >= 1
    # Another prompt length and another number of new tokens in the same bucket reuse the compiled step.
    assert torch.equal(greedy(model, other, n=40, compile=True), greedy(model, other, n=40))
    assert compiles() == before

    # A left-padded batch: each row as its prompt alone.
    batch = torch.zeros(2, 30, dtype=torch.long)
    batch[0, 19:], batch[1] = one[0], other[0]
    mask = (torch.arange(30) >= torch.tensor([[19], [0]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=24, eos_token_id=-1, compile=True)
    assert torch.equal(out[0, 30:], eager[0, 11:])
    assert torch.equal(out[1, 30:], greedy(model, other)[0, 30:])


def test_compiled_decoding_follows_adapters_and_merged_weights():
    model = varied_model(5)
    apply_lora(model, rank=4, target_modules="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".B." in n:
                p.normal_(std=0.5)
    model.eval()
    ids = torch.randint(5, 3800, (1, 12), generator=torch.Generator().manual_seed(2))
    with_adapter = greedy(model, ids)
    set_adapter(model, None)
    without = greedy(model, ids)
    assert not torch.equal(with_adapter, without)  # the adapter changes the reply
    assert torch.equal(greedy(model, ids, compile=True), without)
    set_adapter(model, "default")
    assert torch.equal(greedy(model, ids, compile=True), with_adapter)
    # Merging rewrites the weights in place: the compiled step must read them, not a copy taken at compile time.
    merge_lora(model)
    assert torch.equal(greedy(model, ids, compile=True), with_adapter)
    unmerge_lora(model)
    set_adapter(model, None)
    assert torch.equal(greedy(model, ids, compile=True), without)


def test_compiled_lora_training_matches_eager_without_graph_breaks():
    # What --use_compile 1 runs: the same losses and updates as eager, prompt rows (-100) included, in one graph.
    from conftest import tiny_config
    from model.model_minimind import MiniMindForCausalLM

    torch.manual_seed(0)
    eager = MiniMindForCausalLM(tiny_config()).train()
    apply_lora(eager, rank=4, target_modules="all-linear")
    twin = MiniMindForCausalLM(tiny_config()).train()
    apply_lora(twin, rank=4, target_modules="all-linear")
    twin.load_state_dict(eager.state_dict())
    x = torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(3))
    labels = x.clone()
    labels[:, :7] = -100  # an SFT prompt
    labels[0, 20:] = -100  # and padding
    explained = torch._dynamo.explain(twin)(input_ids=x, labels=labels)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(twin)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (eager, twin)]
    for _ in range(3):
        losses = []
        for net, opt in zip((eager, compiled), opts):
            loss = net(input_ids=x, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5, losses
    for (name, a), b in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    # Batches of other lengths (the trainer pads each to its longest): one more graph with a dynamic length, then
    # no compile per length; a batch without targets gives 0 as eager does.
    for length in (30, 17, 41):
        y = torch.randint(0, 512, (4, length))
        compiled(input_ids=y, labels=y).loss.backward()
        if length == 30:
            graphs = compiles()
    assert compiles() == graphs
    assert compiled(input_ids=x[:, :17], labels=torch.full((4, 17), -100)).loss.item() == 0.0
