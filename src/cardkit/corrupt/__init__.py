"""Common corruptions (CIFAR-10-C) and their official file layout."""

from cardkit.corrupt.registry import (BENCHMARK, EXTRAS, SEVERITIES, check_severity, corrupt,
                                      corruption_names, expand_names, lookup_corruption,
                                      register_corruption)

__all__ = ["BENCHMARK", "EXTRAS", "SEVERITIES", "check_severity", "corrupt", "corruption_names",
           "expand_names", "lookup_corruption", "register_corruption"]
