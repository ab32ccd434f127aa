import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Writable } from 'node:stream';
import type { Command } from 'commander';
import pino from 'pino';
import { InstanceLock } from '../jobs/instance-lock.ts';
import { runJob } from '../jobs/job-runner.ts';
import { faultPoint } from '../core/fault-points.ts';
import { Scheduler } from '../jobs/scheduler.ts';
import { homeOf, openCatalog } from './context.ts';
import { passwordFor } from './job-commands.ts';

const levelNames: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };

/** `snapshift daemon`: runs scheduled jobs; `--install-unit` writes a systemd unit for it. */
export function registerDaemonCommand(program: Command): void {
  program
    .command('daemon')
    .description('run scheduled jobs (one daemon per catalog); logs JSON to <home>/logs/daemon.log')
    .option('--install-unit [path]', 'write a systemd unit instead of running', false)
    .addHelpText('after', '\nExamples:\n  snapshift daemon\n  snapshift daemon --install-unit && systemctl enable --now snapshift')
    .action(async (options: { installUnit: string | boolean }, command: Command) => {
      const home = homeOf(command);
      if (options.installUnit !== false) return installUnit(home, typeof options.installUnit === 'string' ? options.installUnit : '/etc/systemd/system/snapshift.service');
      using _lock = InstanceLock.acquire(join(home, 'daemon.lock'));
      mkdirSync(join(home, 'logs'), { recursive: true });
      const logger = pino(
        { base: { pid: process.pid } },
        pino.multistream([{ stream: pino.destination({ dest: join(home, 'logs', 'daemon.log'), sync: true, mkdir: true }) }, { stream: humanStream() }]),
      );
      using catalog = openCatalog(command);
      const controller = new AbortController();
      const scheduler = new Scheduler({
        catalog,
        logger,
        run: async (job) => {
          faultPoint('daemon.after-job-start');
          return runJob(job, { catalog, home, password: await passwordFor(job), signal: controller.signal });
        },
      });
      scheduler.start();
      logger.info({ home }, `snapshift daemon started (pid ${process.pid}), ${catalog.jobs.listJobs().filter((job) => job.definition.schedule).length} scheduled job(s)`);
      await new Promise<void>((resolveStop) => {
        const stop = (signal: string) => {
          logger.info(`${signal}: stopping; running jobs end cleanly`);
          controller.abort();
          resolveStop();
        };
        process.once('SIGINT', () => stop('SIGINT'));
        process.once('SIGTERM', () => stop('SIGTERM'));
      });
      await scheduler.stop();
      logger.info('snapshift daemon stopped');
    });
}

/** Human lines on the terminal: time, level, message; the file keeps the full JSON. */
function humanStream(): Writable {
  return new Writable({
    write(chunk: Buffer, _encoding, done) {
      try {
        const entry = JSON.parse(chunk.toString()) as { time: number; level: number; msg: string };
        process.stderr.write(`${new Date(entry.time).toISOString()} ${(levelNames[entry.level] ?? entry.level).toString().padEnd(5)} ${entry.msg}\n`);
      } catch {
        process.stderr.write(chunk);
      }
      done();
    },
  });
}

function installUnit(home: string, path: string): void {
  const launcher = resolve(fileURLToPath(new URL('../../bin/snapshift', import.meta.url)));
  const unit = `[Unit]
Description=snapshift backup scheduler
After=network-online.target

[Service]
Type=simple
ExecStart=${process.execPath} ${launcher} --home ${home} daemon
Restart=on-failure
KillSignal=SIGTERM
TimeoutStopSec=600

[Install]
WantedBy=multi-user.target
`;
  writeFileSync(path, unit);
  console.log(`wrote ${path}; enable it with: systemctl daemon-reload && systemctl enable --now ${path.split('/').at(-1)}`);
}
