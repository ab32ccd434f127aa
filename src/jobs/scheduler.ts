import { Cron } from 'croner';
import type { Logger } from 'pino';
import type { Catalog } from '../catalog/index.ts';
import { messageOf } from '../core/errors.ts';
import { parseJobDefinition, type JobDefinition } from './job-definition.ts';

export interface SchedulerOptions {
  catalog: Catalog;
  logger: Logger;
  /** Runs one job to its end; the scheduler never starts a job again while this is pending. */
  run: (job: JobDefinition) => Promise<{ state: string; sessionId: string }>;
  /** How often due jobs are looked for. */
  tickMs?: number;
}

/**
 * Runs jobs when their cron schedule says so. A job whose previous run has not ended is skipped (and
 * the skip logged), so a job never runs twice at once; a fire time missed while the daemon was down is
 * not caught up.
 */
export class Scheduler {
  readonly #running = new Map<string, Promise<void>>();
  #lastTick = new Date();
  #timer: NodeJS.Timeout | undefined;

  constructor(private readonly options: SchedulerOptions) {}

  start(): void {
    this.#lastTick = new Date();
    const tick = () => {
      this.#tick();
      this.#timer = setTimeout(tick, this.options.tickMs ?? 1000);
    };
    this.#timer = setTimeout(tick, this.options.tickMs ?? 1000);
  }

  /** Stops scheduling and waits for running jobs to end. */
  async stop(): Promise<void> {
    clearTimeout(this.#timer);
    await Promise.allSettled(this.#running.values());
  }

  #tick(): void {
    const now = new Date();
    const since = this.#lastTick;
    this.#lastTick = now;
    for (const stored of this.options.catalog.jobs.listJobs()) {
      let job: JobDefinition;
      try {
        job = parseJobDefinition(stored.definition);
      } catch (error) {
        this.options.logger.error({ job: stored.name }, `job ${stored.name} is invalid: ${messageOf(error)}`);
        continue;
      }
      if (!job.schedule) continue;
      const next = new Cron(job.schedule, { paused: true }).nextRun(since);
      if (!next || next > now) continue;
      if (this.#running.has(job.name)) {
        this.options.logger.warn({ job: job.name }, `job ${job.name} is due but its previous run has not ended: skipped`);
        continue;
      }
      this.options.logger.info({ job: job.name }, `starting job ${job.name}`);
      const run = this.options
        .run(job)
        .then(
          (result) => this.options.logger.info({ job: job.name, session: result.sessionId, state: result.state }, `job ${job.name} ended: ${result.state}`),
          (error: unknown) => this.options.logger.error({ job: job.name }, `job ${job.name} could not run: ${messageOf(error)}`),
        )
        .finally(() => this.#running.delete(job.name));
      this.#running.set(job.name, run);
    }
  }
}
