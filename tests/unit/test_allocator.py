"""The CPU ranks' allocator (moe_dist/distributed/allocator.py): which environment it sets, and that
tcmalloc really stops the page faults of a large tensor allocated afresh every step."""

import os
import subprocess
import sys

import pytest

from moe_dist.distributed.allocator import allocator_env, find_tcmalloc

# allocate, touch and free a 64 MiB tensor 6 times (an E=64 expert gradient's size), as every backward
# does; print the minor page faults of the last 5 rounds
SCRIPT = """
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = torch.ones(16 * 2 ** 20); del t
before = faults()
for _ in range(5):
    t = torch.ones(16 * 2 ** 20); del t
print(faults() - before)
"""


def _faults(env_changes):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_choices_and_existing_preload():
    assert allocator_env({"MOE_DIST_ALLOCATOR": "system"}) == {}
    assert allocator_env({"LD_PRELOAD": "/opt/libjemalloc.so.2"}) == {}  # the user's malloc wins
    with pytest.raises(ValueError, match="MOE_DIST_ALLOCATOR='tcmaloc' is unknown"):
        allocator_env({"MOE_DIST_ALLOCATOR": "tcmaloc"})
    library = find_tcmalloc()
    assert library or os.environ.get("CI") != "true", ".ci/run installs libtcmalloc-minimal4"
    if library:
        assert allocator_env({}) == {"LD_PRELOAD": library}
        assert allocator_env({"LD_PRELOAD": "libfoo.so"}) == {"LD_PRELOAD": f"{library} libfoo.so"}


@pytest.mark.skipif(not find_tcmalloc() and os.environ.get("CI") != "true", reason="no tcmalloc installed")
def test_tcmalloc_stops_page_faults_of_fresh_large_tensors():
    glibc = _faults({"MOE_DIST_ALLOCATOR": "system"})
    tcmalloc = _faults(allocator_env({}))
    # glibc mmaps every 64 MiB block afresh: 5 x 16,384 pages of 4 KiB fault in again (5 x 32 pages of
    # 2 MiB where transparent huge pages are always on); tcmalloc reuses the freed span
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    always = os.path.exists(thp) and "[always]" in open(thp).read()
    assert glibc >= 0.9 * 5 * (32 if always else 16_384), glibc
    assert tcmalloc < glibc / 10, (tcmalloc, glibc)
