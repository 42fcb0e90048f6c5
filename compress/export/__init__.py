"""Writers for the formats serving runtimes read, and checks that run them.

    ggml.py               GGML block formats (Q8_0, Q4_0, Q4_1, f16, bf16) and the exact re-encoding of GPTQ codes
    arch.py               per-architecture table: HF config -> GGUF metadata, tensor names, the Q/K row permutation
    vocab.py              HF tokenizer -> GGUF tokenizer metadata (tokens, types, merges, special ids, pre-tokenizer)
    writer.py             HF causal LM (float or GPTQ QuantLinear) + tokenizer -> one .gguf file, tensor by tensor
    llamacpp.py           load a .gguf in llama.cpp (llama-cpp-python): logits, perplexity, KLD, decode tokens/s
    compressed_tensors.py GPTQ v1 -> compressed-tensors pack-quantized, the layout vLLM's default quantized path reads
"""
