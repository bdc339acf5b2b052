"""Scoring chunks of users: the shared inference path (`runs.inference`), under the names the job uses."""

from recsys_mamba.runs.inference import (
    candidate_chunk,
    encode,
    next_item_scores,
    popularity_scores,
    rank_rows,
    topk_chunk,
    user_scores,
    whole_history,
)

__all__ = [
    "candidate_chunk",
    "encode",
    "next_item_scores",
    "popularity_scores",
    "rank_rows",
    "topk_chunk",
    "user_scores",
    "whole_history",
]
