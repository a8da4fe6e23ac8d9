"""``python -m gpl.simulate OUT.jsonl``: write a simulated MovieLens funnel as JSONL and print its stats."""

from gpl.simulate.export import main

main()
