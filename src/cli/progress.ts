import cliProgress from 'cli-progress';
import { formatBytes } from './format.ts';

/**
 * The figures of a bar line: done and size both in byte units ("1.0 GiB of 2.0 GiB"). Not `{total}`:
 * cli-progress fills that itself with the raw byte count, whatever the payload says.
 */
const figures = '{percentage}% | {done} of {size} | {rate} | ETA {remaining} | {phase}';

/**
 * Time left at the average rate so far, or "-" while there is no rate. Not cli-progress's {eta_formatted}: it
 * shows "NULL" and "INF" cut to two letters ("LLs", "NFs") when updates come faster than its clock or stall.
 */
function remainingTime(doneBytes: number, totalBytes: number, elapsedS: number): string {
  if (doneBytes <= 0 || totalBytes <= doneBytes) return doneBytes >= totalBytes && totalBytes > 0 ? '0s' : '-';
  const seconds = Math.ceil(((totalBytes - doneBytes) * elapsedS) / doneBytes);
  if (seconds >= 3600) return `${Math.floor(seconds / 3600)}h${String(Math.floor((seconds % 3600) / 60)).padStart(2, '0')}m`;
  if (seconds >= 60) return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, '0')}s`;
  return `${seconds}s`;
}

/** Where bars are drawn: stderr, or a stand-in terminal in tests. */
export type ProgressStream = NodeJS.WritableStream & { isTTY?: boolean };

/**
 * A progress bar on stderr (bytes, rate, ETA) that stays silent when stderr is not a terminal or the
 * output is JSON, so scripts get clean streams.
 */
export class ProgressBar {
  readonly #bar: cliProgress.SingleBar | undefined;
  #started = false;
  readonly #startedAt = performance.now();

  constructor(enabled: boolean, label: string, stream: ProgressStream = process.stderr) {
    if (!enabled || !stream.isTTY) return;
    this.#bar = new cliProgress.SingleBar(
      {
        stream,
        format: `${label} [{bar}] ${figures}`,
        hideCursor: true,
      },
      cliProgress.Presets.shades_classic,
    );
  }

  update(doneBytes: number, totalBytes: number, phase: string): void {
    if (!this.#bar) return;
    const elapsedS = Math.max(0.001, (performance.now() - this.#startedAt) / 1000);
    const payload = { done: formatBytes(doneBytes), size: formatBytes(totalBytes), rate: `${(doneBytes / 1e6 / elapsedS).toFixed(1)} MB/s`, remaining: remainingTime(doneBytes, totalBytes, elapsedS), phase };
    if (!this.#started) {
      this.#bar.start(totalBytes, doneBytes, payload);
      this.#started = true;
    } else {
      this.#bar.setTotal(totalBytes);
      this.#bar.update(doneBytes, payload);
    }
  }

  stop(): void {
    if (this.#started) this.#bar?.stop();
  }
}

/** One bar per running VM plus a session line, on stderr, only on a terminal. */
export class SessionProgress {
  readonly #multi: cliProgress.MultiBar | undefined;
  readonly #bars = new Map<string, cliProgress.SingleBar>();
  readonly #session: cliProgress.SingleBar | undefined;
  readonly #startedAt = performance.now();
  readonly #done = new Map<string, { done: number; total: number }>();

  constructor(enabled: boolean, private readonly jobName: string, stream: ProgressStream = process.stderr) {
    if (!enabled || !stream.isTTY) return;
    this.#multi = new cliProgress.MultiBar({ stream, hideCursor: true, format: `{label} [{bar}] ${figures}` }, cliProgress.Presets.shades_classic);
    this.#session = this.#multi.create(1, 0, { label: `session ${jobName}`.padEnd(16), done: '', size: '', rate: '', remaining: '-', phase: 'starting' });
  }

  update(vmName: string, doneBytes: number, totalBytes: number, phase: string): void {
    if (!this.#multi) return;
    const elapsedS = Math.max(0.001, (performance.now() - this.#startedAt) / 1000);
    this.#done.set(vmName, { done: doneBytes, total: totalBytes });
    let bar = this.#bars.get(vmName);
    const payload = { label: vmName.padEnd(16).slice(0, 16), done: formatBytes(doneBytes), size: formatBytes(totalBytes), rate: `${(doneBytes / 1e6 / elapsedS).toFixed(1)} MB/s`, remaining: remainingTime(doneBytes, totalBytes, elapsedS), phase };
    if (!bar) {
      bar = this.#multi.create(totalBytes, doneBytes, payload);
      this.#bars.set(vmName, bar);
    }
    bar.setTotal(totalBytes);
    bar.update(doneBytes, payload);
    let done = 0;
    let total = 0;
    for (const entry of this.#done.values()) {
      done += entry.done;
      total += entry.total;
    }
    this.#session!.setTotal(Math.max(1, total));
    this.#session!.update(done, { label: `session ${this.jobName}`.padEnd(16).slice(0, 16), done: formatBytes(done), size: formatBytes(total), rate: `${(done / 1e6 / elapsedS).toFixed(1)} MB/s`, remaining: remainingTime(done, total, elapsedS), phase: `${this.#bars.size} VM(s)` });
  }

  stop(): void {
    this.#multi?.stop();
  }
}
