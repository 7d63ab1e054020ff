"""`python -m study`: the study's command line (study/study.py)."""

from study.study import main

main()
