"""Model definitions (torch): the two-tower retriever and the cross-encoder CTR ranker."""
