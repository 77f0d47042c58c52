#!/usr/bin/env python3
"""Where a saga's time goes, from its trace: appends, stream deliveries, reactions.

    python3 -m oteltap --port 4319 > spans.ndjson &     # PyPI oteltap: a real OTLP/HTTP receiver
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4319 petstore serve ...
    # ... place orders one at a time, each until it completes ...
    python3 bench/trace_hops.py spans.ndjson

Reads oteltap's NDJSON (one span a line) and, for every trace that holds a whole saga (the
`POST /petstore-domain/orders` server span through `saga OrderCompleted`), sums three kinds
of time along it:

- appends: the `INSERT <Aggregate>` spans (a statement and its commit);
- deliveries: from the end of an append to the start of the `saga <Event>` span reacting to
  the event it wrote (the event's way through the global stream to the saga runner);
- reactions: from the start of a `saga <Event>` span to the start of its first child (what
  the runner does before it appends or calls a provider: loads, the decision).

Prints the median, least and most of each over the traces, in milliseconds.
"""
import collections
import json
import statistics
import sys


def millis(span, field):
    return int(span[field]) / 1e6


def saga_times(trace):
    """The three sums (and counts) of one whole saga's trace, or None for another trace."""
    by_id = {span["spanId"]: span for span in trace}
    children = collections.defaultdict(list)
    for span in trace:
        children[span["parentSpanId"]].append(span)
    posts = [span for span in trace if span["name"].startswith("POST /petstore-domain/orders")]
    completed = [span for span in trace if span["name"] == "saga OrderCompleted"]
    if not posts or not completed:
        return None
    appends = [span for span in trace if span["name"].startswith("INSERT ")]
    reactions = [span for span in trace if span["name"].startswith("saga ")]
    deliveries = [
        millis(span, "startTimeUnixNano") - millis(by_id[span["parentSpanId"]], "endTimeUnixNano")
        for span in reactions
        if by_id.get(span["parentSpanId"], {}).get("name", "").startswith("INSERT ")
    ]
    before_first_child = [
        min(millis(child, "startTimeUnixNano") for child in children[span["spanId"]])
        - millis(span, "startTimeUnixNano")
        for span in reactions
        if children[span["spanId"]]
    ]
    return {
        "POST to the last reaction's end": millis(completed[0], "endTimeUnixNano")
        - millis(posts[0], "startTimeUnixNano"),
        "appends": sum(millis(s, "endTimeUnixNano") - millis(s, "startTimeUnixNano") for s in appends),
        "appends (count)": len(appends),
        "one append": statistics.median(
            millis(s, "endTimeUnixNano") - millis(s, "startTimeUnixNano") for s in appends
        ),
        "deliveries": sum(deliveries),
        "deliveries (count)": len(deliveries),
        "one delivery": statistics.median(deliveries) if deliveries else 0.0,
        "reactions before their first call": sum(before_first_child),
        "reactions (count)": len(before_first_child),
        "one reaction": statistics.median(before_first_child) if before_first_child else 0.0,
    }


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: trace_hops.py SPANS.ndjson")
    traces = collections.defaultdict(list)
    with open(sys.argv[1]) as lines:
        for line in lines:
            if line.startswith("{"):
                span = json.loads(line)
                traces[span["traceId"]].append(span)
    sagas = [times for times in map(saga_times, traces.values()) if times]
    if not sagas:
        sys.exit("no trace holds a whole saga (POST /orders through saga OrderCompleted)")
    print(f"{len(sagas)} sagas; milliseconds: median (least - most)")
    for key in sagas[0]:
        values = [saga[key] for saga in sagas]
        print(f"{key:36} {statistics.median(values):7.2f}  ({min(values):.2f} - {max(values):.2f})")


if __name__ == "__main__":
    main()
