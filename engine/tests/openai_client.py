"""The official `openai` Python client against a running redline-engine (argv[1] = base URL,
argv[2] = the API key it was started with).

Exits non-zero with a message on the first mismatch; run by tests/openai_client.rs.
"""
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=sys.argv[2], max_retries=0)

# A wrong key is the client's typed 401.
try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()
    raise AssertionError("a wrong API key accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e

models = client.models.list()
model = models.data[0].id
assert model == "SmolLM2-135M-Instruct.Q4_1", model

# Non-streaming completion with usage.
c = client.completions.create(model=model, prompt="The three primary colors are", max_tokens=8, temperature=0)
assert c.object == "text_completion" and c.choices[0].text, c
assert c.usage.completion_tokens == 8 and c.choices[0].finish_reason == "length", c.usage

# Streaming completion: the pieces add up to the non-streaming text (greedy).
pieces = [ch.choices[0].text for ch in client.completions.create(
    model=model, prompt="The three primary colors are", max_tokens=8, temperature=0, stream=True) if ch.choices]
assert "".join(pieces) == c.choices[0].text, (pieces, c.choices[0].text)

# Chat, non-streaming and streaming with usage in the final chunk.
msgs = [{"role": "user", "content": "Say hello in French."}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
assert r.choices[0].message.role == "assistant" and r.choices[0].message.content, r
chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

# Stop sequences cut the text before the stop string.
s = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
assert " 7" not in s.choices[0].text and s.choices[0].finish_reason == "stop", s

# Seeded sampling is reproducible.
a = client.completions.create(model=model, prompt="Once", max_tokens=12, temperature=0.9, seed=42)
b = client.completions.create(model=model, prompt="Once", max_tokens=12, temperature=0.9, seed=42)
assert a.choices[0].text == b.choices[0].text

# The penalties and the logit bias as the client sends them (vLLM's top_k via extra_body).
p = client.completions.create(model=model, prompt="1, 1, 1, 1, 1, 1,", max_tokens=12, temperature=0,
                              frequency_penalty=2.0, presence_penalty=0.5, logit_bias={"28": -100},
                              extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
assert p.usage.completion_tokens >= 1, p

# Echo with logprobs (a loglikelihood, as lm-evaluation-harness asks for one).
ec = client.completions.create(model=model, prompt="The capital of France is", max_tokens=1,
                               temperature=0, echo=True, logprobs=1)
assert ec.choices[0].text.startswith("The capital of France is"), ec
assert ec.choices[0].logprobs.token_logprobs[0] is None and ec.choices[0].logprobs.token_logprobs[1] < 0

# n choices.
nc = client.completions.create(model=model, prompt="Once upon a time,", max_tokens=4, n=2, seed=1)
assert [c.index for c in nc.choices] == [0, 1], nc

# Logprobs, as the client parses them.
lc = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4,
                               temperature=0, logprobs=2)
assert len(lc.choices[0].logprobs.tokens) == lc.usage.completion_tokens, lc.choices[0].logprobs
assert all(lp <= 0 for lp in lc.choices[0].logprobs.token_logprobs)
lr = client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0,
                                    logprobs=True, top_logprobs=2)
entries = lr.choices[0].logprobs.content
assert len(entries) == lr.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries), entries

# Errors surface as the client's typed exceptions; what this server does not serve is refused.
try:
    client.completions.create(model=model, prompt="hi", max_tokens=1, suffix="end")
    raise AssertionError("suffix accepted and ignored")
except openai.BadRequestError as e:
    assert e.code == "unsupported_parameter" and e.param == "suffix", e.body
try:
    client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    client.completions.create(model=model, prompt="hi", max_tokens=100000)
    raise AssertionError("max_tokens past the context accepted")
except openai.BadRequestError as e:
    assert "context" in str(e)

print("openai client: all checks passed")
