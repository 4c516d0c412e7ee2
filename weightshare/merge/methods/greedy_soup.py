"""The greedy soup (Wortsman et al. 2022, "Model soups", ICML, arXiv:2203.05482, Algorithm 1) as a
merge method: ``ws.merge(state_dicts, "greedy_soup", evaluate=fn)``.  It needs whole models and an
evaluation function, so it runs in memory from Python only; the soup itself is ``soup.py``'s."""

from weightshare.merge.registry import FINITE, Param, register_merge
from weightshare.merge.soup import greedy_soup

__all__ = ["greedy_soup"]

register_merge("greedy_soup", source="Wortsman et al. 2022, Model soups (ICML, arXiv:2203.05482), Algorithm 1 "
               "(greedy soup: add in order of held-out score, keep if the soup does not get worse); "
               "mergekit has no greedy soup",
               parameters=(Param("weight", 1.0, per_model=True, rule=FINITE), Param("scores", None, per_model=True),
                           Param("evaluate", required=True)),
               models=(1, None), tensorwise=False)(greedy_soup)
