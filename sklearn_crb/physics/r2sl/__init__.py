"""The linearised super-Lorentzian saturation rate R2sl (Assländer et al., MRM 2022, Eq. 9).

:mod:`.table` holds the shipped table and its lookups.
"""
