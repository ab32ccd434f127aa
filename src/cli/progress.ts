import cliProgress from 'cli-progress';
import { formatBytes } from './format.ts';

/**
 * A progress bar on stderr (bytes, rate, ETA) that stays silent when stderr is not a terminal or the
 * output is JSON, so scripts get clean streams.
 */
export class ProgressBar {
  readonly #bar: cliProgress.SingleBar | undefined;
  #started = false;
  readonly #startedAt = performance.now();

  constructor(enabled: boolean, label: string) {
    if (!enabled || !process.stderr.isTTY) return;
    this.#bar = new cliProgress.SingleBar(
      {
        stream: process.stderr,
        format: `${label} [{bar}] {percentage}% | {done} of {size} | {rate} | ETA {eta_formatted} | {phase}`,
        hideCursor: true,
        etaBuffer: 50,
      },
      cliProgress.Presets.shades_classic,
    );
  }

  update(doneBytes: number, totalBytes: number, phase: string): void {
    if (!this.#bar) return;
    const elapsedS = Math.max(0.001, (performance.now() - this.#startedAt) / 1000);
    // Not `total`: cli-progress fills {total} itself, with the raw byte count.
    const payload = { done: formatBytes(doneBytes), size: formatBytes(totalBytes), rate: `${(doneBytes / 1e6 / elapsedS).toFixed(1)} MB/s`, phase };
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

  constructor(enabled: boolean, private readonly jobName: string) {
    if (!enabled || !process.stderr.isTTY) return;
    this.#multi = new cliProgress.MultiBar(
      { stream: process.stderr, hideCursor: true, format: '{label} [{bar}] {percentage}% | {done} of {total} | {rate} | ETA {eta_formatted} | {phase}', etaBuffer: 50 },
      cliProgress.Presets.shades_classic,
    );
    this.#session = this.#multi.create(1, 0, { label: `session ${jobName}`.padEnd(16), done: '', total: '', rate: '', phase: 'starting' });
  }

  update(vmName: string, doneBytes: number, totalBytes: number, phase: string): void {
    if (!this.#multi) return;
    const elapsedS = Math.max(0.001, (performance.now() - this.#startedAt) / 1000);
    this.#done.set(vmName, { done: doneBytes, total: totalBytes });
    let bar = this.#bars.get(vmName);
    const payload = { label: vmName.padEnd(16).slice(0, 16), done: formatBytes(doneBytes), total: formatBytes(totalBytes), rate: `${(doneBytes / 1e6 / elapsedS).toFixed(1)} MB/s`, phase };
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
    this.#session!.update(done, { label: `session ${this.jobName}`.padEnd(16).slice(0, 16), done: formatBytes(done), total: formatBytes(total), rate: `${(done / 1e6 / elapsedS).toFixed(1)} MB/s`, phase: `${this.#bars.size} VM(s)` });
  }

  stop(): void {
    this.#multi?.stop();
  }
}
