"""The one-line machine description every benchmark prints above its tables."""
import os
import platform


def describe_machine(**versions) -> str:
    """CPU model, cores, load, OS and Python, plus `name=version` pairs the benchmark cares about."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    extra = "".join(f", {name} {version}" for name, version in versions.items())
    return (f"{cpu}, {os.cpu_count()} logical cores, load average {load} (shared machine), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}{extra}")
