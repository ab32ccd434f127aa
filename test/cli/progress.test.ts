// Progress bars speak one unit: "1.0 GiB of 2.0 GiB", never "1.0 GiB of 2147483648" (issue 11). Drawn on a
// stand-in terminal, since the bars stay silent where stderr is not one.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { ProgressBar, SessionProgress, type ProgressStream } from '../../src/cli/progress.ts';

const GiB = 1024 ** 3;

/** A writable that says it is a terminal and keeps what is drawn on it, escape sequences removed. */
function fakeTerminal(): { stream: ProgressStream; text: () => string } {
  let drawn = '';
  const stream = Object.assign(
    new Writable({
      write(chunk: Buffer, _encoding, done) {
        drawn += chunk.toString();
        done();
      },
    }),
    { isTTY: true, columns: 200 },
  );
  // eslint-disable-next-line no-control-regex
  return { stream, text: () => drawn.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b[78]/g, '') };
}

test('a backup or restore bar shows done and size both in byte units', () => {
  const terminal = fakeTerminal();
  const bar = new ProgressBar(true, 'vm1', terminal.stream);
  bar.update(GiB, 2 * GiB, 'copy');
  bar.update(1.5 * GiB, 2 * GiB, 'copy');
  bar.stop();
  assert.match(terminal.text(), /\| 1\.5 GiB of 2\.0 GiB \| [\d.]+ MB\/s \| ETA (\d+s|-) \| copy/);
  assert.doesNotMatch(terminal.text(), /of \d{4,}/);
  assert.doesNotMatch(terminal.text(), /ETA (LL|NF)s/, "not cli-progress's clipped NULL and INF");
});

test("a job run's bars (one per VM and the session's) show done and size both in byte units", () => {
  const terminal = fakeTerminal();
  const progress = new SessionProgress(true, 'nightly', terminal.stream);
  progress.update('vm1', GiB, GiB, 'copy');
  progress.update('vm2', 512 * 1024 ** 2, GiB, 'copy');
  progress.stop();
  const text = terminal.text();
  assert.match(text, /vm1 +\[.*\] 100% \| 1\.0 GiB of 1\.0 GiB \|/);
  assert.match(text, /vm2 +\[.*\] 50% \| 512\.0 MiB of 1\.0 GiB \|/);
  assert.match(text, /session nightly +\[.*\] 75% \| 1\.5 GiB of 2\.0 GiB \|/);
  assert.doesNotMatch(text, /of \d{4,}/, 'no raw byte count');
  assert.match(text, /vm1 .* ETA 0s \| copy/);
  assert.doesNotMatch(text, /ETA (LL|NF)s/);
});

test('no terminal, no bar: nothing is written', () => {
  const terminal = fakeTerminal();
  (terminal.stream as { isTTY?: boolean }).isTTY = false;
  const bar = new ProgressBar(true, 'vm1', terminal.stream);
  bar.update(GiB, 2 * GiB, 'copy');
  bar.stop();
  assert.equal(terminal.text(), '');
});
