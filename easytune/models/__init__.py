"""Model families (Flax linen: Llama 2/3, Mistral, Qwen2) and Hugging Face checkpoint conversion.

Axis letters used in every einsum and shape comment:

    B  batch
    T  length (query positions)      S  length (key positions; same tokens as T)
    D  embed (hidden_size)
    H  query heads                   K  key/value heads      G  query heads per kv head (H // K)
    E  head dim (head_dim)
    F  mlp (intermediate_size)
    V  vocab

Every module of this package that writes shapes uses these letters.
"""
