"""``fastflamingo bench``: side-by-side benchmarks of fastflamingo against its peers.

Modules: :mod:`.harness` (check-then-time of every provider on one case), :mod:`.timing`,
:mod:`.memory`, :mod:`.env` (device, versions, bandwidth), :mod:`.image_causal` and
:mod:`.perceiver` (the kernel providers), :mod:`.kernels` (the kernel suite), :mod:`.stages` and
:mod:`.e2e` (the end-to-end suite), :mod:`.peers` (the peers' own models), :mod:`.rows`,
:mod:`.report`, :mod:`.plots`, :mod:`.cli`.
"""
