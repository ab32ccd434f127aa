import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BusyClock } from '../../src/core/busy-clock.ts';

/** Drives a BusyClock through intervals [start, end] on a synthetic time line and returns its busy time. */
function busyOf(intervals: Array<[number, number]>): number {
  let now = 0;
  const clock = new BusyClock(() => now);
  const events = intervals.flatMap(([start, end]) => [{ at: start, kind: 'begin' as const }, { at: end, kind: 'end' as const }]);
  // At equal times an end comes before a begin: touching intervals are two, not one.
  events.sort((a, b) => a.at - b.at || (a.kind === 'end' ? -1 : 1));
  for (const event of events) {
    now = event.at;
    if (event.kind === 'begin') clock.begin();
    else clock.end();
  }
  return clock.busyMs;
}

test('busy time is the union of the intervals, not their sum', () => {
  assert.equal(busyOf([]), 0);
  assert.equal(busyOf([[10, 30]]), 20);
  assert.equal(busyOf([[0, 10], [20, 30]]), 20, 'disjoint: the sum');
  assert.equal(busyOf([[0, 100], [20, 30], [40, 90]]), 100, 'nested: the outer one');
  assert.equal(busyOf([[0, 60], [50, 100]]), 100, 'overlapping: counted once');
  assert.equal(busyOf([[0, 10], [10, 20]]), 20, 'touching');
  // A pack writer's shape: appends one after another, each pack's seal running beside the next appends.
  const appends: Array<[number, number]> = [[0, 60], [60, 120], [160, 220], [260, 320]];
  const seals: Array<[number, number]> = [[60, 160], [160, 260], [260, 360], [360, 460]];
  assert.equal(busyOf([...appends, ...seals]), 460, 'the wall time from first write to last seal');
  assert.ok(busyOf([...appends, ...seals]) < [...appends, ...seals].reduce((sum, [a, b]) => sum + (b - a), 0));
});

test('an interval still open counts up to now', () => {
  let now = 0;
  const clock = new BusyClock(() => now);
  clock.begin();
  now = 5;
  clock.begin();
  now = 7;
  clock.end();
  now = 12;
  assert.equal(clock.busyMs, 12);
  clock.end();
  now = 50;
  assert.equal(clock.busyMs, 12);
  assert.throws(() => clock.end(), /without a matching begin/);
});
