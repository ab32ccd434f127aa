import { SnapshiftError } from '../core/errors.ts';
import { faultPoint } from '../core/fault-points.ts';
import type { RestorePointSummary } from './manifest.ts';
import type { Repository } from './repository.ts';

export interface RetentionPolicy {
  keepLast?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
}

export interface RetentionDecision {
  point: RestorePointSummary;
  keep: boolean;
  /** Why it is kept ("last", "daily 2024-05-01", ...), empty when it goes. */
  reasons: string[];
}

/**
 * restic's rules, per VM: newest first, keep the N newest; for daily/weekly/monthly keep the newest point of
 * each of the N newest distinct days/ISO weeks/months that have one. Buckets use UTC so results do not
 * depend on where forget runs.
 */
export function applyRetention(points: readonly RestorePointSummary[], policy: RetentionPolicy): RetentionDecision[] {
  const rules: Array<{ name: string; count: number; bucket: (d: Date) => string }> = [
    { name: 'last', count: policy.keepLast ?? 0, bucket: () => '' },
    { name: 'daily', count: policy.keepDaily ?? 0, bucket: (d) => d.toISOString().slice(0, 10) },
    { name: 'weekly', count: policy.keepWeekly ?? 0, bucket: isoWeek },
    { name: 'monthly', count: policy.keepMonthly ?? 0, bucket: (d) => d.toISOString().slice(0, 7) },
  ];
  if (rules.every((r) => r.count <= 0)) throw new SnapshiftError('USAGE', 'forget needs at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly (refusing to forget everything)');
  const decisions: RetentionDecision[] = [];
  const byVm = new Map<string, RestorePointSummary[]>();
  for (const point of points) byVm.set(point.vmName, [...(byVm.get(point.vmName) ?? []), point]);
  for (const vmPoints of byVm.values()) {
    const newestFirst = [...vmPoints].sort((a, b) => b.createdAt.localeCompare(a.createdAt) || b.id.localeCompare(a.id));
    const vmDecisions = newestFirst.map((point) => ({ point, keep: false, reasons: [] as string[] }));
    for (const rule of rules) {
      let left = rule.count;
      let lastBucket: string | undefined;
      for (const decision of vmDecisions) {
        if (left <= 0) break;
        const bucket = rule.name === 'last' ? decision.point.id : rule.bucket(new Date(decision.point.createdAt));
        if (bucket === lastBucket) continue;
        lastBucket = bucket;
        left--;
        decision.keep = true;
        decision.reasons.push(rule.name === 'last' ? 'last' : `${rule.name} ${bucket}`);
      }
    }
    decisions.push(...vmDecisions);
  }
  return decisions;
}

function isoWeek(date: Date): string {
  const day = new Date(Date.UTC(date.getUTCFullYear(), date.getUTCMonth(), date.getUTCDate()));
  const weekday = day.getUTCDay() || 7;
  day.setUTCDate(day.getUTCDate() + 4 - weekday);
  const yearStart = Date.UTC(day.getUTCFullYear(), 0, 1);
  const week = Math.ceil(((day.getTime() - yearStart) / 86_400_000 + 1) / 7);
  return `${day.getUTCFullYear()}-W${String(week).padStart(2, '0')}`;
}

/** Removes the manifests retention does not keep (data goes with the next gc). */
export async function forgetRestorePoints(repository: Repository, policy: RetentionPolicy, opts: { vmName?: string; dryRun?: boolean } = {}): Promise<RetentionDecision[]> {
  await using _lock = opts.dryRun ? undefined : await repository.lock('exclusive', 'forget');
  const decisions = applyRetention(await repository.listRestorePoints(opts.vmName), policy);
  if (opts.dryRun) return decisions;
  const forgotten = decisions.filter((decision) => !decision.keep);
  for (const [at, decision] of forgotten.entries()) {
    await repository.backend.delete(`manifests/${decision.point.id}`);
    if (at < forgotten.length - 1) faultPoint('retention.mid-forget');
  }
  return decisions;
}
