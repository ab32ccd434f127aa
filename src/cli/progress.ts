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

  constructor(enabled: boolean, private readonly label: string) {
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
