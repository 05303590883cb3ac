"""EP fallback in the planner: a device whose first EP is an accelerator is also planned for the
first CPU EP its profile lists (ORT runs a package on the next EP in the profile's order), and takes
that plan only when no plan its first EP runs fits.

    profiles, alts = with_fallbacks(profiles)     # adds "android-low@XNNPACK" beside "android-low"
    ... plan every profile ...
    apply_fallbacks(devs, alts)                   # android-low takes its @XNNPACK choice if it has none
"""

from __future__ import annotations

from semedge.compress.targets import CPU_EPS
from semedge.core.errors import UserError

SEP = "@"


def from_ep(profile, ep_name: str):
    """The profile with its execution providers from `ep_name` on (the package is built for that EP)."""
    eps = profile.execution_providers
    i = next((i for i, e in enumerate(eps) if e.name == ep_name), None)
    if i is None:
        raise UserError(f"{profile.name}: the plan is for EP {ep_name}, which the profile does not list "
                        f"({', '.join(e.name for e in eps)})", "re-run `semedge plan` with this profile")
    return profile.model_copy(update={"execution_providers": eps[i:]})


def with_fallbacks(profiles: list) -> tuple[list, dict[str, str]]:
    """(profiles + one renamed copy per accelerator-first profile that lists a CPU EP, alt name -> device)."""
    out, alts = list(profiles), {}
    for p in profiles:
        cpu = next((e.name for e in p.execution_providers if e.name in CPU_EPS), None)
        if p.first_ep.name in CPU_EPS or cpu is None:
            continue
        alt = from_ep(p, cpu).model_copy(update={"name": f"{p.name}{SEP}{cpu}"})
        out.append(alt)
        alts[alt.name] = p.name
    return out, alts


def apply_fallbacks(devs: dict, alts: dict[str, str]) -> None:
    """A device with no fitting plan takes its fallback entry's choice (recorded as such); the fallback
    entries leave `devs` either way."""
    for alt, d in alts.items():
        a = devs.pop(alt)
        info = devs[d]
        if info["fits"] or not a["fits"]:
            continue
        first = info["ep"]
        why = (f"{first} (first EP) runs no plan that fits ({info['failing_budget']} budget; closest "
               f"{info['closest']}); planned for {a['ep']}, the first CPU EP in the profile")
        info.update({k: v for k, v in a.items() if k not in ("profile", "budgets")})
        info["fallback"] = {"from_ep": first, "reason": why}
