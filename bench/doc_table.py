"""Writes a bench script's lines into docs/BENCHMARKS.md between its
markers `<!-- NAME:begin -->` and `<!-- NAME:end -->` (appended, under
`heading` if given, when the markers are not there yet), and prints them."""
import re


def write_table(doc, name, lines, heading=None):
    text = open(doc).read()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = begin + "\n" + "\n".join(lines) + "\n" + end
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += "\n" + (heading + "\n\n" if heading else "") + block + "\n"
    open(doc, "w").write(text)
    print("\n".join(lines))
