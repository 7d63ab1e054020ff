"""The paper's claims in miniature (`python -m study`): the arms, seeds and pipeline seeds
(study.py), and their statistics, tables and figures (report.py)."""
