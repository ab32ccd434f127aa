import { Cron } from 'croner';
import { checkVmName } from '../catalog/vm-name.ts';
import { SnapshiftError, messageOf } from '../core/errors.ts';
import { isProcessingMode, processingModeList, type ProcessingMode } from '../processing/backup-run.ts';
import type { RetentionPolicy } from '../repository/index.ts';
import { defaultBootMarker } from '../restore/vm/boot-verification.ts';


/** What to protect and how: the job as an admin writes it (CLI flags or YAML). */
export interface JobDefinition {
  name: string;
  vms: string[];
  repository: string;
  mode: ProcessingMode;
  failoverToRegular: boolean;
  quiesce: boolean;
  vmsPerStorageSnapshot: number;
  parallel: number;
  retention: RetentionPolicy;
  /** Cron expression (`scheduleFormat`); absent = run by hand only. */
  schedule?: string;
  /** File holding the repository password; else SNAPSHIFT_PASSWORD when the job runs. */
  passwordFile?: string;
  /** Caps the read rate from production storage, in MB/s. */
  maxReadRateMBps?: number;
  /** Boot each new restore point (instant recovery, no network) and record whether it came up. */
  verifyBoot?: VerifyBootPolicy;
}

/** How a job verifies that its restore points boot: the console marker to wait for, and for how long. */
export interface VerifyBootPolicy {
  marker: string;
  timeoutSeconds: number;
}

/** Also `snapshift backup`'s defaults: a backup by hand is processed like a job's. */
export const jobDefaults = { mode: 'storage-snapshot', failoverToRegular: true, quiesce: false, vmsPerStorageSnapshot: 10, parallel: 2 } as const;

/** What a schedule may be, in the words the CLI help and README use. croner would take a 7th (year) field too; we keep to these. */
export const scheduleFormat = '5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first';

/**
 * Checks a job from an untrusted source (CLI, YAML, the catalog) and fills defaults. Every problem is
 * named with the field, so an admin fixing a YAML file knows where to look.
 */
export function parseJobDefinition(input: unknown): JobDefinition {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) throw invalid('a job must be a mapping of fields');
  const raw = input as Record<string, unknown>;
  const known = new Set(['name', 'vms', 'repository', 'repo', 'mode', 'failoverToRegular', 'quiesce', 'vmsPerStorageSnapshot', 'parallel', 'retention', 'schedule', 'passwordFile', 'maxReadRateMBps', 'verifyBoot']);
  for (const key of Object.keys(raw)) if (!known.has(key)) throw invalid(`unknown field "${key}"`);
  const name = requireString(raw.name, 'name');
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name)) throw invalid(`job name "${name}" must be letters, digits, . _ - (at most 64)`);
  const vms = raw.vms;
  if (!Array.isArray(vms) || vms.length === 0 || !vms.every((vm) => typeof vm === 'string' && vm !== '')) throw invalid(`job ${name}: "vms" must be a non-empty list of VM names`);
  for (const vm of vms as string[]) {
    try {
      checkVmName(vm);
    } catch (error) {
      throw invalid(`job ${name}: ${messageOf(error)}`);
    }
  }
  const mode = raw.mode ?? jobDefaults.mode;
  if (!isProcessingMode(mode)) throw invalid(`job ${name}: mode must be ${processingModeList}, not "${String(mode)}"`);
  const schedule = raw.schedule === undefined || raw.schedule === null || raw.schedule === '' ? undefined : requireString(raw.schedule, 'schedule');
  if (schedule !== undefined) validateCron(schedule, name);
  const definition: JobDefinition = {
    name,
    vms: [...new Set(vms as string[])],
    repository: requireString(raw.repository ?? raw.repo, 'repository'),
    mode,
    failoverToRegular: optionalBoolean(raw.failoverToRegular, 'failoverToRegular') ?? jobDefaults.failoverToRegular,
    quiesce: optionalBoolean(raw.quiesce, 'quiesce') ?? jobDefaults.quiesce,
    vmsPerStorageSnapshot: optionalCount(raw.vmsPerStorageSnapshot, 'vmsPerStorageSnapshot') ?? jobDefaults.vmsPerStorageSnapshot,
    parallel: optionalCount(raw.parallel, 'parallel') ?? jobDefaults.parallel,
    retention: parseRetention(raw.retention, name),
    ...(schedule ? { schedule } : {}),
    ...(raw.passwordFile !== undefined ? { passwordFile: requireString(raw.passwordFile, 'passwordFile') } : {}),
    ...(raw.maxReadRateMBps !== undefined ? { maxReadRateMBps: optionalCount(raw.maxReadRateMBps, 'maxReadRateMBps') } : {}),
    ...(parseVerifyBoot(raw.verifyBoot, name) ?? {}),
  };
  return definition;
}

function parseRetention(value: unknown, jobName: string): RetentionPolicy {
  if (value === undefined || value === null) return {};
  if (typeof value !== 'object' || Array.isArray(value)) throw invalid(`job ${jobName}: "retention" must be a mapping like { keepLast: 7 }`);
  const retention: RetentionPolicy = {};
  for (const [key, count] of Object.entries(value as Record<string, unknown>)) {
    if (key !== 'keepLast' && key !== 'keepDaily' && key !== 'keepWeekly' && key !== 'keepMonthly') throw invalid(`job ${jobName}: unknown retention rule "${key}"`);
    retention[key] = optionalCount(count, `retention.${key}`);
  }
  return retention;
}

/** `verifyBoot: true`, or `{ marker: 'login:', timeoutSeconds: 300 }` (either field optional). */
function parseVerifyBoot(value: unknown, jobName: string): { verifyBoot: VerifyBootPolicy } | undefined {
  if (value === undefined || value === null || value === false) return undefined;
  const defaults = { marker: defaultBootMarker, timeoutSeconds: 300 };
  if (value === true) return { verifyBoot: defaults };
  if (typeof value !== 'object' || Array.isArray(value)) throw invalid(`job ${jobName}: "verifyBoot" must be true, false, or a mapping like { marker: "login:", timeoutSeconds: 300 }`);
  const raw = value as Record<string, unknown>;
  for (const key of Object.keys(raw)) if (key !== 'marker' && key !== 'timeoutSeconds') throw invalid(`job ${jobName}: unknown verifyBoot field "${key}"`);
  const marker = raw.marker === undefined ? defaults.marker : requireString(raw.marker, 'verifyBoot.marker');
  try {
    new RegExp(marker);
  } catch (error) {
    throw invalid(`job ${jobName}: verifyBoot.marker is not a regular expression (${(error as Error).message})`);
  }
  return { verifyBoot: { marker, timeoutSeconds: optionalCount(raw.timeoutSeconds, 'verifyBoot.timeoutSeconds') ?? defaults.timeoutSeconds } };
}

function validateCron(expression: string, jobName: string): void {
  const fields = expression.trim().split(/\s+/).length;
  const nickname = expression.trim().startsWith('@'); // @daily, @weekly, …
  if (!nickname && fields !== 5 && fields !== 6) throw invalid(`job ${jobName}: schedule "${expression}" has ${fields} field(s); a schedule has ${scheduleFormat}`);
  try {
    new Cron(expression, { paused: true, mode: '5-or-6-parts' });
  } catch (error) {
    throw invalid(`job ${jobName}: schedule "${expression}" is not a cron expression of ${scheduleFormat} (${(error as Error).message})`);
  }
}

function requireString(value: unknown, field: string): string {
  if (typeof value !== 'string' || value.trim() === '') throw invalid(`"${field}" is required and must be text`);
  return value;
}

function optionalBoolean(value: unknown, field: string): boolean | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'boolean') throw invalid(`"${field}" must be true or false`);
  return value;
}

function optionalCount(value: unknown, field: string): number | undefined {
  if (value === undefined) return undefined;
  const number = typeof value === 'string' ? Number(value) : value;
  if (typeof number !== 'number' || !Number.isInteger(number) || number < 1) throw invalid(`"${field}" must be a whole number ≥ 1, not ${JSON.stringify(value)}`);
  return number;
}

function invalid(message: string): SnapshiftError {
  return new SnapshiftError('USAGE', `invalid job: ${message}`);
}
