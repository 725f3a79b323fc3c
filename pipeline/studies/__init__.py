"""Study- and series-level routing: completion, MPPS, release, delivery by study (README, Studies)."""
