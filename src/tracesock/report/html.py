"""The report as one self-contained HTML page (``tracesock report FILE --html OUT.html``).

Everything is inline -- CSS, a few lines of JavaScript, SVG drawn here -- so
the page opens from disk or a mail attachment with no network.  Each slow
call gets a timeline: its ``syscall.*`` children as bars on a time axis
(sends and receives on one lane, readiness waits on another, every EINTR
interruption marked on a third), its TCP snapshot and its verdict in words.
"""

from __future__ import annotations

from html import escape

from ..core.events import SOCKET_RECEIVES, SOCKET_SENDS
from ..core.sites import kind
from ..exporters.profile import LEAVES, OVER_CAP, frame_text, sites
from ..exporters.summary import format_bytes
from . import VERDICT_WORDS, tcp_fields

__all__ = ["render"]

WIDTH = 700  # the time axis, px
LABEL = 90  # lane labels, px
LANE = 26
LANES = ("call", "syscalls", "waits", "EINTR")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2430;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
h3{font-size:15px;margin:0 0 6px;font-family:ui-monospace,Menlo,Consolas,monospace}
.sub{color:#5b6675;margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0 10px}
th,td{padding:3px 10px;border-bottom:1px solid #eef1f4;text-align:left;white-space:nowrap}
th{background:#f5f7f9;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
.call{border:1px solid #dde3ea;border-radius:6px;padding:12px 14px;margin:14px 0;background:#fcfdfe}
.verdict{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;color:#fff;background:#6b7785}
.v-receiver_slow{background:#2f6fd0}.v-send_buffer_small{background:#8a4fd6}.v-network{background:#d0602f}
.v-signals{background:#c2304a}.v-timeout{background:#7a5a00}.v-none{background:#6b7785}
.words{margin:6px 0 8px;max-width:960px}
.grid{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.tcp td{padding:2px 8px}
svg text{font:11px ui-monospace,Menlo,Consolas,monospace;fill:#3a4552}
.bar{stroke:none}.b-call{fill:#c9d3de}.b-send{fill:#2f6fd0}.b-recv{fill:#1f9d74}.b-other{fill:#5b6675}
.b-eagain{fill:#aab4bf}.b-eintr{fill:#c2304a}.b-ready{fill:#4caf50}.b-timeout{fill:#e0a020}
.b-interrupted{fill:#c2304a}.mark{stroke:#c2304a;stroke-width:1.5}
.axis{stroke:#9aa5b1;stroke-width:1}.grid-line{stroke:#eef1f4;stroke-width:1}
.legend span{display:inline-block;margin-right:14px}.sw{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:-1px;border-radius:2px}
#hover{min-height:1.4em;color:#3a4552}
.empty{color:#5b6675}
"""

JS = """
(function(){
  document.body.setAttribute('data-ready','1');
  var out=document.getElementById('hover');
  if(!out){return;}
  var bars=document.querySelectorAll('svg .bar, svg .mark');
  for(var i=0;i<bars.length;i++){
    bars[i].addEventListener('mouseenter',function(e){
      var t=e.target.querySelector('title');
      out.textContent=t?t.textContent:'';
    });
  }
})();
"""


def _ms(us):
    return f"{us / 1e3:.1f} ms" if us >= 10_000 else f"{us / 1e3:.3f} ms"


def _kind(child):
    """(lane, css class) of a syscall.* child."""
    t = child.tags
    errno = t.get("tracesock.syscall.errno")
    if child.name == "syscall.poll":
        outcome = t.get("tracesock.wait.outcome") or "ready"
        return "waits", f"b-{outcome}" if outcome in ("ready", "timeout", "interrupted") else "b-other"
    if errno == "EINTR":
        return "syscalls", "b-eintr"
    if errno in ("EAGAIN", "EWOULDBLOCK"):
        return "syscalls", "b-eagain"
    method = child.name.split(".", 1)[1] if "." in child.name else child.name
    if method in SOCKET_SENDS or method.startswith("send"):
        return "syscalls", "b-send"
    if method in SOCKET_RECEIVES or method.startswith("recv"):
        return "syscalls", "b-recv"
    return "syscalls", "b-other"


def _interrupted(child):
    t = child.tags
    return t.get("tracesock.syscall.errno") == "EINTR" or t.get("tracesock.wait.outcome") == "interrupted"


def _cut_short(span):
    """Ids of the blocking ``syscall.send`` children of a ``sendall`` on a blocking
    socket that returned less than the rest of the buffer: a signal arrived after
    progress (the call counts each as an EINTR retry).  The first send is the
    non-blocking try, whose partial result only means the buffer was full."""
    t = span.tags
    if span.method != "sendall" or "tracesock.timeout" in t:
        return set()
    remaining = t.get("tracesock.bytes.requested")
    if not isinstance(remaining, int):
        return set()
    out = set()
    first = True
    for c in span.children:
        if c.name != "syscall.send":
            continue
        result = c.tags.get("tracesock.syscall.result")
        if not isinstance(result, int) or result < 0:
            first = False
            continue
        if not first and 0 <= result < remaining:
            out.add(c.span_id)
        remaining -= result
        first = False
    return out


def interrupted_children(span):
    """The ``syscall.*`` children a signal interrupted: EINTR, or a blocking send cut short."""
    short = _cut_short(span)
    return [c for c in span.children if _interrupted(c) or c.span_id in short]


def _ticks(total_us):
    """Tick step (us) giving 4-10 ticks over the call."""
    if total_us <= 0:
        return 1
    step = 1
    while total_us / step > 10:
        for m in (2, 5, 10):
            if total_us / (step * m) <= 10:
                return step * m
        step *= 10
    return step


def timeline(span):
    """The SVG timeline of one call and its ``syscall.*`` children."""
    total = max(span.duration_us, 1)
    height = LANE * len(LANES) + 24
    scale = WIDTH / total
    parts = [f'<svg class="timeline" data-call="{escape(span.name)}" data-span="{escape(span.span_id)}" '
             f'width="{LABEL + WIDTH + 20}" height="{height}" viewBox="0 0 {LABEL + WIDTH + 20} {height}" '
             f'role="img" '
             f'aria-label="timeline of {escape(span.name)}">']
    step = _ticks(total)
    tick = 0
    while tick <= total:
        x = LABEL + tick * scale
        parts.append(f'<line class="grid-line" x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{LANE * len(LANES)}"/>')
        parts.append(f'<text x="{x:.1f}" y="{LANE * len(LANES) + 16}" text-anchor="middle">'
                     f'{tick / 1e3:g} ms</text>')
        tick += step
    parts.append(f'<line class="axis" x1="{LABEL}" y1="{LANE * len(LANES)}" x2="{LABEL + WIDTH}" '
                 f'y2="{LANE * len(LANES)}"/>')
    for i, lane in enumerate(LANES):
        parts.append(f'<text x="4" y="{i * LANE + 17}">{lane}</text>')
    parts.append(f'<rect class="bar b-call" x="{LABEL}" y="4" width="{WIDTH}" height="{LANE - 8}">'
                 f'<title>{escape(span.name)} {_ms(span.duration_us)}</title></rect>')
    short = _cut_short(span)
    for c in span.children:
        if not c.name.startswith("syscall."):
            continue
        lane, css = _kind(c)
        cut = c.span_id in short
        y = LANES.index(lane) * LANE + 4
        x = LABEL + max(c.start_us - span.start_us, 0) * scale
        w = max(c.duration_us * scale, 1.5)
        t = c.tags
        desc = [c.name, f"at +{_ms(c.start_us - span.start_us)}", f"for {_ms(c.duration_us)}"]
        if t.get("tracesock.syscall.result") is not None and c.name != "syscall.poll":
            desc.append(f"result {t['tracesock.syscall.result']}")
        if t.get("tracesock.syscall.errno"):
            desc.append(str(t["tracesock.syscall.errno"]))
        if t.get("tracesock.wait.outcome"):
            desc.append(str(t["tracesock.wait.outcome"]))
        if cut:
            desc.append("cut short by a signal")
        title = escape(", ".join(desc))
        parts.append(f'<rect class="bar {css}" data-name="{escape(c.name)}" x="{x:.2f}" y="{y}" '
                     f'width="{w:.2f}" height="{LANE - 8}"><title>{title}</title></rect>')
        if _interrupted(c) or cut:
            mx = min(x + w, LABEL + WIDTH - 0.75)  # when the signal cut it
            my = LANES.index("EINTR") * LANE
            parts.append(f'<line class="mark" x1="{mx:.2f}" y1="{my + 4}" x2="{mx:.2f}" '
                         f'y2="{my + LANE - 4}"><title>{title}</title></line>')
    parts.append("</svg>")
    return "".join(parts)


def _breakdown(span):
    """A stacked bar: how much of the call TCP_INFO attributes to each cause (totals,
    not positions in time; the causes can overlap, so shares are capped at the call)."""
    t = span.tags
    total = span.duration_us / 1e6
    if total <= 0 or not any(k in t for k in ("tracesock.tcp.busy", "tracesock.signals.duration")):
        return ""
    rwnd = float(t.get("tracesock.tcp.rwnd_limited") or 0)
    sndbuf = float(t.get("tracesock.tcp.sndbuf_limited") or 0)
    busy = float(t.get("tracesock.tcp.busy") or 0)
    parts = [("receive window full (rwnd_limited)", rwnd, "#2f6fd0"),
             ("send buffer full (sndbuf_limited)", sndbuf, "#8a4fd6"),
             ("sending, neither window full (cwnd / our buffer)", max(busy - rwnd - sndbuf, 0), "#d0602f"),
             ("signal handlers", float(t.get("tracesock.signals.duration") or 0), "#c2304a")]
    out = [f'<svg class="breakdown" width="{LABEL + WIDTH + 20}" height="34" role="img" '
           f'aria-label="where the time went"><text x="4" y="14">time went</text>']
    x = LABEL
    for label, value, color in parts:
        if value <= 0 or x >= LABEL + WIDTH:
            continue
        w = min(value / total * WIDTH, LABEL + WIDTH - x)
        out.append(f'<rect class="bar" x="{x:.1f}" y="3" width="{w:.1f}" height="16" fill="{color}">'
                   f'<title>{escape(label)}: {value * 1e3:.1f} ms ({value / total:.0%} of the call)</title></rect>')
        if w > 60:
            out.append(f'<text x="{x + 4:.1f}" y="15" style="fill:#fff">{value / total:.0%}</text>')
        x += w
    out.append(f'<text x="{LABEL}" y="31">TCP_INFO totals by cause, not in time order: blue rwnd, '
               f'purple sndbuf, orange other busy, red handlers</text>')
    out.append('</svg>')
    return "".join(out)


LEGEND = ('<p class="legend">'
          '<span><i class="sw" style="background:#2f6fd0"></i>send</span>'
          '<span><i class="sw" style="background:#1f9d74"></i>recv</span>'
          '<span><i class="sw" style="background:#aab4bf"></i>EAGAIN</span>'
          '<span><i class="sw" style="background:#4caf50"></i>poll: ready</span>'
          '<span><i class="sw" style="background:#e0a020"></i>poll: timeout</span>'
          '<span><i class="sw" style="background:#c2304a"></i>interrupted by a signal (EINTR)</span>'
          '</p>')


def _call_card(index, span):
    t = span.tags
    verdict = span.verdict
    moved = t.get("tracesock.bytes.transferred")
    facts = []
    if moved is not None:
        facts.append(format_bytes(moved))
    for key, one, many in (("tracesock.syscalls", "syscall", "syscalls"),
                           ("tracesock.partial_sends", "partial send", "partial sends"),
                           ("tracesock.eintr_retries", "EINTR retry", "EINTR retries"),
                           ("tracesock.waits", "wait", "waits"), ("tracesock.eagain", "EAGAIN", "EAGAIN")):
        if t.get(key):
            facts.append(f"{t[key]} {one if t[key] == 1 else many}")
    if t.get("error.type"):
        facts.append(f"error {t['error.type']}")
    out = [f'<div class="call" id="call-{index}" data-call="{escape(span.name)}"'
           f' data-verdict="{escape(verdict or "")}">']
    out.append(f'<h3>{escape(span.name)} &mdash; {_ms(span.duration_us)} &mdash; '
               f'{escape(span.local or "?")} &rarr; {escape(span.peer or "?")}</h3>')
    sub = escape(", ".join(facts))
    if span.site:
        sub += f" &middot; at {escape(span.site)}"
    out.append(f'<div class="sub">{sub}</div>')
    if verdict:
        out.append(f'<div><span class="verdict v-{escape(verdict)}">{escape(verdict)}</span></div>')
        out.append(f'<p class="words">{escape(VERDICT_WORDS.get(verdict, ""))}</p>')
    else:
        out.append('<p class="words empty">No verdict: only send-side TCP calls that waited '
                   'get one.</p>')
    out.append('<div class="grid"><div>')
    out.append(timeline(span))
    kids = [c for c in span.children if c.name.startswith("syscall.")]
    if not kids:
        out.append('<p class="empty">No syscall children recorded for this call '
                   '(run with --detail syscalls to have every step).</p>')
    else:
        interrupted = len(interrupted_children(span))
        out.append(f'<p class="sub">{len(kids)} syscall/wait children, {interrupted} interrupted by a signal</p>')
    out.append(_breakdown(span))
    out.append('</div>')
    fields = tcp_fields(span)
    if fields:
        out.append('<table class="tcp"><tr><th colspan="2">TCP snapshot (deltas over the call)</th></tr>')
        for k, v in fields:
            out.append(f'<tr><td>{escape(k)}</td><td class="n">{escape(v)}</td></tr>')
        out.append('</table>')
    out.append('</div></div>')
    return "".join(out)


def render(report, *, title="tracesock report"):
    o = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f'<title>{escape(title)}</title><style>{CSS}{FLAME_CSS}</style></head><body>']
    o.append(f'<h1>{escape(title)}</h1>')
    o.append(f'<p class="sub">{escape(", ".join(report.sources))} &middot; {report.calls} socket calls '
             f'in {report.spans} spans</p>')
    for w in report.warnings:
        o.append(f'<p class="sub">warning: {escape(w)}</p>')

    o.append('<h2>Top call sites</h2>')
    if report.profile is None:
        o.append('<p class="sub">From the call spans\' code.* attributes (calls that got a span). '
                 'Run with <code>tracesock run --profile FILE</code> and give FILE to the report for '
                 'every call and a flame graph.</p>')
    if report.sites:
        o.append(sites_table(report.sites))
    else:
        o.append('<p class="empty">No call sites.</p>')
    if report.profile is not None:
        o.append(flame_section(report.profile))

    o.append('<h2>Slowest calls</h2>')
    if not report.slowest:
        o.append('<p class="empty">No socket calls in the trace.</p>')
    else:
        o.append('<table id="slowest"><tr><th class="n">duration</th><th>call</th><th>peer</th>'
                 '<th>verdict</th><th>site</th></tr>')
        for i, s in enumerate(report.slowest):
            o.append(f'<tr><td class="n">{_ms(s.duration_us)}</td>'
                     f'<td class="mono"><a href="#call-{i}">{escape(s.name)}</a></td>'
                     f'<td class="mono">{escape(s.peer or "-")}</td>'
                     f'<td>{escape(s.verdict or "-")}</td><td class="mono">{escape(s.site or "")}</td></tr>')
        o.append('</table>')
        o.append(LEGEND)
        o.append('<div id="hover" class="mono">(point at a bar for its details)</div>')
        for i, s in enumerate(report.slowest):
            o.append(_call_card(i, s))

    o.append('<h2>Connections</h2>')
    if not report.connections:
        o.append('<p class="empty">None.</p>')
    else:
        o.append('<table id="connections"><tr><th>local &rarr; peer</th><th>proto</th><th class="n">sent</th>'
                 '<th class="n">received</th><th class="n">calls</th><th class="n">syscalls</th>'
                 '<th class="n">partial sends</th><th class="n">EINTR retries</th><th class="n">waits</th>'
                 '<th class="n">time waiting</th></tr>')
        for c in report.connections:
            o.append(f'<tr><td class="mono">{escape(c.local)} &rarr; {escape(c.peer)}</td>'
                     f'<td>{escape(c.transport)}</td><td class="n">{format_bytes(c.sent)}</td>'
                     f'<td class="n">{format_bytes(c.received)}</td><td class="n">{c.calls}</td>'
                     f'<td class="n">{c.syscalls}</td><td class="n">{c.partial_sends}</td>'
                     f'<td class="n">{c.eintr_retries}</td><td class="n">{c.waits}</td>'
                     f'<td class="n">{_ms(c.wait_us)}</td></tr>')
        o.append('</table><p class="sub">time waiting: readiness waits (poll) plus the time a blocking '
                 'send was held by the kernel.</p>')

    o.append('<h2>recv buffer efficiency</h2>')
    if not report.recv_calls:
        o.append('<p class="empty">No recv calls with a buffer size in the trace.</p>')
    else:
        avg = report.recv_average_fill
        o.append(f'<p>{report.recv_calls} recv calls; {report.recv_resized} had a buffer larger than what '
                 f'arrived and were resized'
                 + (f' (average fill {avg:.0%})' if avg is not None else '')
                 + f'; {report.recv_under_filled} were at most half full.</p>')
        o.append('<table id="recv"><tr><th>call site</th><th class="n">buffer</th><th class="n">calls</th>'
                 '<th class="n">resized</th><th class="n">average fill</th><th class="n">&le;50% full</th></tr>')
        for r in report.recv_sites:
            fill = f"{r.average_fill:.0%}" if r.average_fill is not None else "-"
            o.append(f'<tr><td class="mono">{escape(r.site or "-")}</td><td class="n">{format_bytes(r.buffer_size)}</td>'
                     f'<td class="n">{r.calls}</td><td class="n">{r.resized}</td><td class="n">{fill}</td>'
                     f'<td class="n">{r.under_filled}</td></tr>')
        o.append('</table>')
    o.append(f'<script>{JS}</script>')
    if report.profile is not None:
        o.append(f'<script>{FLAME_JS}</script>')
    o.append('</body></html>\n')
    return "".join(o)


# --- profile: top call sites and the flame graph -------------------------------------

FLAME_WIDTH = 1000  # px
FLAME_ROW = 18  # px
FLAME_MIN = 0.0005  # nodes narrower than this share of the total are left out

FLAME_CSS = """
#flamegraph{border:1px solid #dde3ea;border-radius:6px;background:#fcfdfe}
#flamegraph .f rect{stroke:#fff;stroke-width:.5;cursor:pointer}
#flamegraph .f text{font:11px ui-monospace,Menlo,Consolas,monospace;fill:#1d2430;pointer-events:none}
#flamegraph .k-user rect{fill:#f2a65a}#flamegraph .k-library rect{fill:#9cc3e6}
#flamegraph .k-thread rect{fill:#c9d3de}#flamegraph .k-method rect{fill:#b79ce6}
#flamegraph .k-syscalls rect{fill:#2f6fd0}#flamegraph .k-waiting rect{fill:#c2304a}
#flamegraph .k-other rect{fill:#aab4bf}#flamegraph .k-synthetic rect{fill:#e8e2c8}
#flamegraph .k-syscalls text,#flamegraph .k-waiting text{fill:#fff}
"""

FLAME_JS = """
(function(){
  var svg=document.getElementById('flamegraph');
  if(!svg){return;}
  var W=+svg.getAttribute('data-width'), out=document.getElementById('flame-hover');
  var nodes=svg.querySelectorAll('g.f');
  function draw(x0,w0,d0){
    for(var i=0;i<nodes.length;i++){
      var g=nodes[i], x=+g.getAttribute('data-x'), w=+g.getAttribute('data-w'), d=+g.getAttribute('data-d');
      var r=g.querySelector('rect'), t=g.querySelector('text');
      var inside=x>=x0-1e-9 && x+w<=x0+w0+1e-9 && (d>=d0 || (x<=x0+1e-9 && x+w>=x0+w0-1e-9));
      if(!inside){g.style.display='none';continue;}
      g.style.display='';
      var px=(x-x0)/w0*W, pw=Math.max(w/w0*W,0.5);
      r.setAttribute('x',px.toFixed(2)); r.setAttribute('width',pw.toFixed(2));
      var label=g.getAttribute('data-label'), n=Math.floor((pw-6)/6.6);
      t.setAttribute('x',(px+3).toFixed(2));
      t.textContent = n<3 ? '' : (label.length>n ? label.slice(0,n-1)+'\\u2026' : label);
    }
  }
  svg.addEventListener('click',function(e){
    var g=e.target.closest('g.f'); if(!g){return;}
    draw(+g.getAttribute('data-x'),+g.getAttribute('data-w'),+g.getAttribute('data-d'));
  });
  svg.addEventListener('mouseover',function(e){
    var g=e.target.closest('g.f'); if(g&&out){out.textContent=g.querySelector('title').textContent;}
  });
  var reset=document.getElementById('flame-reset');
  if(reset){reset.addEventListener('click',function(){draw(0,1,0);});}
  draw(0,1,0);
  document.body.setAttribute('data-ready','1');
})();
"""


class _Node:
    __slots__ = ("name", "kind", "ns", "calls", "bytes", "children")

    def __init__(self, name, kind):
        self.name = name
        self.kind = kind
        self.ns = 0
        self.calls = 0
        self.bytes = 0
        self.children = {}

    def child(self, name, kind):
        node = self.children.get(name)
        if node is None:
            node = self.children[name] = _Node(name, kind)
        return node


def _frame_kind(frame):
    name, path, line = frame
    if not path:
        return "synthetic"
    return "user" if kind(path) == "user" else "library"


def flame_tree(data):
    """All threads' socket time as one tree: thread > frames > socket.<method> > time split."""

    root = _Node("all threads", "thread")
    stacks = list(data.stacks) + ([data.overflow] if data.overflow is not None else [])
    for s in stacks:
        path = [("thread " + s.thread, "thread")]
        path += [(frame_text(f), _frame_kind(f)) for f in s.frames]
        path.append(("socket." + s.method if s.method else OVER_CAP, "method"))
        nodes = [root]
        for name, lane in path:
            nodes.append(nodes[-1].child(name, lane))
        for n in nodes:
            n.calls += s.calls
            n.bytes += s.sent + s.received
            n.ns += s.total_ns
        for leaf, ns in zip(LEAVES, (s.syscall_ns, s.wait_ns, s.other_ns)):
            if ns > 0:
                node = nodes[-1].child(leaf, leaf.strip("[]"))
                node.ns += ns
                node.calls += s.calls
    return root


def flame_svg(data):
    root = flame_tree(data)
    total = root.ns or 1
    rows = []

    def place(node, x, depth):
        w = node.ns / total
        if w < FLAME_MIN and depth > 0:
            return 0
        rows.append((node, x, w, depth))
        cx = x
        for child in sorted(node.children.values(), key=lambda c: (-c.ns, c.name)):
            place(child, cx, depth + 1)
            cx += child.ns / total
        return depth

    place(root, 0.0, 0)
    depth = max(d for _, _, _, d in rows) + 1
    height = depth * FLAME_ROW + 2
    out = [f'<svg id="flamegraph" data-width="{FLAME_WIDTH}" width="{FLAME_WIDTH}" height="{height}" '
           f'viewBox="0 0 {FLAME_WIDTH} {height}" role="img" aria-label="socket time by Python stack">']
    for node, x, w, d in rows:
        share = node.ns / total
        title = f"{node.name} \u2014 {_ms(node.ns / 1e3)} ({share:.1%} of socket time), {node.calls} calls"
        if node.bytes and node.kind not in ("syscalls", "waiting", "other"):
            title += f", {format_bytes(node.bytes)}"
        px, pw = x * FLAME_WIDTH, max(w * FLAME_WIDTH, 0.5)
        label = node.name if d else f"all threads: {_ms(node.ns / 1e3)} of socket time"
        out.append(f'<g class="f k-{node.kind}" data-x="{x:.6f}" data-w="{w:.6f}" data-d="{d}" '
                   f'data-label="{escape(label)}"><title>{escape(title)}</title>'
                   f'<rect x="{px:.2f}" y="{d * FLAME_ROW}" width="{pw:.2f}" height="{FLAME_ROW - 1}"/>'
                   f'<text x="{px + 3:.2f}" y="{d * FLAME_ROW + 12}"></text></g>')
    out.append("</svg>")
    return "".join(out)


FLAME_LEGEND = ('<p class="legend">'
                '<span><i class="sw" style="background:#f2a65a"></i>your code</span>'
                '<span><i class="sw" style="background:#9cc3e6"></i>standard library / packages</span>'
                '<span><i class="sw" style="background:#b79ce6"></i>socket call</span>'
                '<span><i class="sw" style="background:#2f6fd0"></i>in syscalls</span>'
                '<span><i class="sw" style="background:#c2304a"></i>waiting (poll, blocking send)</span>'
                '<span><i class="sw" style="background:#aab4bf"></i>other (Python, signal handlers)</span>'
                '</p>')


def sites_table(sites, limit=20):
    o = ['<table id="sites"><tr><th>call site</th><th>function</th><th class="n">calls</th>'
         '<th class="n">sent</th><th class="n">received</th><th class="n">total time</th>'
         '<th class="n">waiting</th><th class="n">syscalls</th><th class="n">EINTR retries</th></tr>']
    for r in sites[:limit]:
        o.append(f'<tr><td class="mono" title="{escape(str(r.file))}">{escape(r.label)}</td>'
                 f'<td class="mono">{escape(r.function)}</td><td class="n">{r.calls}</td>'
                 f'<td class="n">{format_bytes(r.sent)}</td><td class="n">{format_bytes(r.received)}</td>'
                 f'<td class="n">{_ms(r.total_ns / 1e3)}</td><td class="n">{_ms(r.wait_ns / 1e3)}</td>'
                 f'<td class="n">{r.syscalls}</td><td class="n">{r.eintr_retries}</td></tr>')
    o.append('</table>')
    if len(sites) > limit:
        o.append(f'<p class="sub">({len(sites) - limit} more call sites)</p>')
    return "".join(o)


def flame_section(data):
    o = ['<h2>Socket time by Python stack</h2>',
         '<p class="sub">Every socket call of the program, by the Python stack that made it '
         '(one block per thread at the top); each call\'s time split into syscalls, waiting and '
         'the rest. Width is time. Click a frame to zoom, '
         '<a href="#" id="flame-reset" onclick="return false">reset</a>.</p>',
         FLAME_LEGEND, flame_svg(data),
         '<div id="flame-hover" class="mono">(point at a frame for its time, calls and bytes)</div>']
    if data.over_cap_calls or data.truncated_stacks:
        o.append(f'<p class="sub">Bounds: {data.over_cap_calls} calls over the cap of {data.max_stacks} '
                 f'distinct stacks (counted in "[stacks over the cap]"), {data.truncated_stacks} stacks '
                 f'cut at {data.max_depth} frames.</p>')
    return "".join(o)


def flame_page(data, *, title="tracesock profile"):
    """A self-contained page with only the top call sites and the flame graph of a profile."""

    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f'<title>{escape(title)}</title><style>{CSS}{FLAME_CSS}</style></head><body>',
        f'<h1>{escape(title)}</h1>',
        '<h2>Top call sites</h2>', sites_table(sites(data)),
        flame_section(data),
        f'<script>{FLAME_JS}</script></body></html>\n'])
