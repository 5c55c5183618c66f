"""The agent's metadata XML and man page, in the shape fence-agents prints
them (``resource-agent``, ``longdesc``, ``vendor-url``, ``parameters`` with
getopt/content/shortdesc, ``actions``), which pacemaker parses."""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from fence.options import Opt


@dataclass(frozen=True)
class Action:
    name: str
    timeout: str = ""
    on_target: bool = False
    automatic: bool = False


def _param(o: Opt, name: str, deprecated: bool) -> list[str]:
    attrs = f'name={quoteattr(name)} unique="0" required="{int(o.required)}"'
    if deprecated:
        attrs += ' deprecated="1"'
    elif o.obsoletes:
        attrs += f" obsoletes={quoteattr(o.obsoletes)}"
    content = f'type="{o.type}"' + (f" default={quoteattr(o.default)}"
                                    if o.default is not None else "")
    lines = [f"\t<parameter {attrs}>", f"\t\t<getopt mixed={quoteattr(o.getopt_text())} />"]
    if o.choices:
        lines.append(f"\t\t<content {content}  >")
        lines += [f"\t\t\t<option value={quoteattr(c)} />" for c in o.choices]
        lines.append("\t\t</content>")
    else:
        lines.append(f"\t\t<content {content}  />")
    lines += [f'\t\t<shortdesc lang="en">{escape(o.desc)}</shortdesc>', "\t</parameter>"]
    return lines


def metadata(name: str, shortdesc: str, longdesc: str, opts: list[Opt],
             actions: list[Action], vendor_url: str = "") -> str:
    """The XML ``-o metadata`` prints."""
    out = ['<?xml version="1.0" ?>',
           f"<resource-agent name={quoteattr(name)} shortdesc={quoteattr(shortdesc)} >",
           f"<longdesc>{escape(longdesc)}</longdesc>",
           f"<vendor-url>{escape(vendor_url)}</vendor-url>", "<parameters>"]
    # fencing.py lists the device options sorted by name (deprecated alias
    # beside its successor), then the generic ones in their fixed order.
    for o in opts:
        if o.obsoletes and o.obsoletes < o.name:
            out += _param(o, o.obsoletes, True)
        out += _param(o, o.name, False)
        if o.obsoletes and o.obsoletes > o.name:
            out += _param(o, o.obsoletes, True)
    out += ["</parameters>", "<actions>"]
    for a in actions:
        attrs = f"name={quoteattr(a.name)}"
        if a.on_target:
            attrs += ' on_target="1"'
        if a.automatic:
            attrs += ' automatic="1"'
        if a.timeout:
            attrs += f" timeout={quoteattr(a.timeout)}"
        out.append(f"\t<action {attrs}/>")
    out += ["</actions>", "</resource-agent>"]
    return "\n".join(out) + "\n"


def manpage(name: str, shortdesc: str, longdesc: str, opts: list[Opt],
            actions: list[Action]) -> str:
    """A man(7) page (``-o manpage``)."""
    def roff(text: str) -> str:
        return text.replace("\\", "\\\\").replace("\n.", "\n\\&.")

    out = [f'.TH {name.upper()} 8 "" "storaged" "Fence agents"', ".SH NAME",
           f"{name} \\- {roff(shortdesc)}", ".SH DESCRIPTION", roff(longdesc),
           ".SH PARAMETERS"]
    for o in opts:
        out += [".TP", f".B {roff(o.getopt_text())}",
                roff(o.desc) + (f" (Default Value: {roff(o.default)})"
                                if o.default is not None else "")
                + (" This parameter is always required." if o.required else ""),
                ]
    out.append(".SH ACTIONS")
    for a in actions:
        out += [".TP", f"\\fB{a.name}\\fP"]
    out += [".SH STDIN PARAMETERS",
            "Without command-line options the agent reads name=value lines on stdin, "
            "one per line, named as the long options without dashes."]
    return "\n".join(out) + "\n"
