"""Print the pip requirements of the given extras of pyproject.toml, one per line, for Docker builds.

Images install exactly what the package declares (no second list to keep in step) but not the package itself,
so an image carries only the code it copies: the server image has no training code.
"""
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted, seen, lines = list(sys.argv[2:]), set(), list(project["dependencies"])
while wanted:
    extra = wanted.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for requirement in project["optional-dependencies"][extra]:
        own = re.fullmatch(rf"{project['name']}\[([\w,]+)\]", requirement)
        if own:
            wanted.extend(own.group(1).split(","))
        else:
            lines.append(requirement)
print("\n".join(dict.fromkeys(lines)))
