"""Tiny models for the tensor-parallel tests: the project's GPT and transformers' Llama (with
grouped-query attention), Mistral, Qwen2 and GPT-2, built from a config (nothing downloaded),
with the same parameters in every process for a given seed."""

import torch

FAMILIES = ("gpt", "llama", "mistral", "qwen2", "gpt2")
VOCAB = 128


def build(family: str, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    if family == "gpt":
        from ichiban_comm.models import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=vocab, seq_len=16, n_layer=2, n_head=8, d_model=64))
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    if family == "llama":
        cfg, cls = tf.LlamaConfig(**common, tie_word_embeddings=False), tf.LlamaForCausalLM
    elif family == "mistral":
        cfg, cls = tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM
    elif family == "qwen2":  # biased q/k/v, head tied to the embedding
        cfg, cls = tf.Qwen2Config(**common, tie_word_embeddings=True), tf.Qwen2ForCausalLM
    elif family == "gpt2":  # fused c_attn Conv1D, tied head
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=8, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    return cls(cfg).float()


def batch(seed: int = 1, b: int = 2, t: int = 8, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    ids[0, 0] = labels[0, -1] = vocab - 1   # the last id: on the last rank, next to padding
    return ids, labels


def logits_and_loss(family, model, ids, labels):
    """(logits, loss) through the model's own forward."""
    if family == "gpt":
        return model(ids), model(ids, labels)
    return model(ids).logits, model(input_ids=ids, labels=labels).loss
