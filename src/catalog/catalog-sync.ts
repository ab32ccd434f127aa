import type { Repository, RestorePointSummary } from '../repository/index.ts';
import type { Catalog, RestorePointRecord } from './catalog.ts';

export interface CatalogSyncReport {
  repository: string;
  /** Restore points the catalog lacked, now recorded from their manifests. */
  added: string[];
  /** Catalog rows of this repository whose manifest is gone (forgotten elsewhere, or by hand). */
  removed: string[];
  /** Already recorded for this repository. */
  unchanged: number;
  /** Manifests in this repository that the catalog records under another repository path: left as they are. */
  elsewhere: string[];
  /** Manifests that cannot be read (`snapshift check` says why): neither added nor removed. */
  damaged: string[];
}

/**
 * Makes the catalog's view of one repository match its manifests (the repository is the truth): adds the
 * restore points it lacks, with VM, time, mode and statistics from the manifest, and removes rows whose
 * manifest is gone. A catalog lost with its host is rebuilt this way, so losing it never loses a backup.
 */
export async function syncCatalogWithRepository(catalog: Catalog, repository: Repository): Promise<CatalogSyncReport> {
  const manifestIds = new Set(await repository.restorePointIds());
  const readable = await repository.listRestorePoints();
  const recorded = new Map(catalog.listRestorePoints().map((point) => [point.id, point]));
  const report: CatalogSyncReport = { repository: repository.path, added: [], removed: [], unchanged: 0, elsewhere: [], damaged: [] };

  for (const summary of readable) {
    const known = recorded.get(summary.id);
    if (!known) {
      catalog.addRestorePoint(restorePointRecordOf(summary, repository.path));
      report.added.push(summary.id);
    } else if (known.repositoryPath === repository.path) {
      report.unchanged++;
    } else {
      report.elsewhere.push(summary.id);
    }
  }
  const readableIds = new Set(readable.map((summary) => summary.id));
  report.damaged = [...manifestIds].filter((id) => !readableIds.has(id)).sort();
  report.removed = [...recorded.values()].filter((point) => point.repositoryPath === repository.path && !manifestIds.has(point.id)).map((point) => point.id);
  catalog.removeRestorePoints(report.removed);
  return report;
}

/**
 * The catalog row a backup would have written, rebuilt from the manifest's `extra` (regular-mode.ts and
 * storage-snapshot-mode.ts write `mode`, `stats`, `failoverReason`, `storage` and `rbdCbt` there).
 */
export function restorePointRecordOf(summary: RestorePointSummary, repositoryPath: string): RestorePointRecord {
  const extra = summary.extra;
  const stats = isRecord(extra.stats) ? { ...extra.stats } : {};
  if (typeof extra.failoverReason === 'string') stats.failoverReason = extra.failoverReason;
  if (Array.isArray(extra.storage)) stats.storageKinds = extra.storage;
  // The storage hunter keeps a retained RBD base only while a catalog row names it (stats.retainedSnapshots).
  const retained = retainedSnapshotsOf(extra.rbdCbt);
  if (retained.length > 0) stats.retainedSnapshots = retained;
  const mode = typeof extra.mode === 'string' ? extra.mode : typeof stats.mode === 'string' ? stats.mode : 'unknown';
  return { id: summary.id, vmName: summary.vmName, repositoryPath, createdAt: summary.createdAt, mode, stats };
}

function retainedSnapshotsOf(rbdCbt: unknown): string[] {
  if (!isRecord(rbdCbt) || !isRecord(rbdCbt.disks)) return [];
  return Object.values(rbdCbt.disks).flatMap((disk) => (isRecord(disk) && typeof disk.image === 'string' && typeof disk.snapshot === 'string' ? [`${disk.image}@${disk.snapshot}`] : []));
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
