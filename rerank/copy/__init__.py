"""The copywriter (stage three): one grounded line of recommendation copy per final item.

    templates   the corpus: prompts of facts and the lines written from them by templates
    grounding   the check every line passes (Python and TF ops) and the fallback line
    copywriter  tokenizer, prompt tables, the GPT-2 model, training, the run directory
    decoding    the KV-cached sampling loop in plain TF ops
    graph       the served graph (`CopywriterModule`); `serving.export` writes its versions
    evaluation  grounding, diversity, perplexity and latency of the served graph
"""
