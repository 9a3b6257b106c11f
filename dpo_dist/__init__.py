"""dpo-dist, rank side: distributed DPO training for Llama and Gemma 3 on CPU, CUDA and Gaudi (HPU).

The head-node launcher lives in the sibling package ``launch``. ``dpo_dist.tiny``
builds the embedded default (tiny models, tokenizer and preference data) used
when no model hub or dataset hub can be reached.
"""

__version__ = "0.1.0"
