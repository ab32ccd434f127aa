import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Catalog } from '../../src/catalog/index.ts';

/**
 * What the engine itself can leave whatever the hypervisor: storage snapshots in a btrfs mount's snapshot
 * folder, ledger rows, and reader daemons of ours (qemu-storage-daemon children with the run folder in their
 * command line). Listed as readable lines; [] when clean. Each suite adds what its hypervisor can leave.
 */
export function engineLeftovers(catalog: Catalog, runDir: string, btrfsMount?: string): string[] {
  const found: string[] = [];
  if (btrfsMount) {
    const snapshots = join(btrfsMount, '.snapshift-snapshots');
    if (existsSync(snapshots)) for (const name of readdirSync(snapshots)) found.push(`storage snapshot ${name}`);
  }
  for (const entry of catalog.listVmSnapshotLedger()) found.push(`VM-snapshot ledger row ${entry.id} (${entry.vmName})`);
  for (const entry of catalog.listStorageSnapshotLedger()) found.push(`storage-snapshot ledger row ${entry.id}`);
  for (const pid of readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
    let cmdline = '';
    try {
      cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    } catch {
      continue; // ended while we looked
    }
    if (cmdline.includes('qemu-storage-daemon') && cmdline.includes(runDir)) found.push(`reader daemon pid ${pid}`);
  }
  return found;
}
