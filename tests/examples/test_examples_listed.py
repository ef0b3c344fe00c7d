"""Every example is tested, short, and listed in the README with its true count of glue lines (`# fastlt`)."""

import os
import re

from example_loader import EXAMPLES, REPOSITORY_ROOT

GLUE_LINE = re.compile(r"^\s*[^#\s].*  # fastlt")  # code followed by the marker; pure comments do not count


def example_names():
    return sorted(name[:-3] for name in os.listdir(EXAMPLES) if name.endswith(".py"))


def test_each_example_is_tested_short_and_listed_with_its_glue_count():
    with open(os.path.join(REPOSITORY_ROOT, "README.md")) as readme:
        listed = dict(re.findall(r"\(examples/(\w+)\.py\).*?Glue: (\d+) lines", readme.read(), flags=re.DOTALL))
    names = example_names()
    assert len(names) == 6 and sorted(listed) == names
    for name in names:
        with open(os.path.join(EXAMPLES, f"{name}.py")) as source:
            lines = source.read().splitlines()
        assert len(lines) <= 120, name
        assert sum(bool(GLUE_LINE.match(line)) for line in lines) == int(listed[name]), name
        assert os.path.exists(os.path.join(os.path.dirname(__file__), f"test_{name}.py")), name
