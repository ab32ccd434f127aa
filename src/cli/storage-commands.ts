import type { Command } from 'commander';
import { openVm } from '../hypervisor/registry.ts';
import { locateImage } from '../storage/registry.ts';
import { openCatalog, printJson } from './context.ts';
import { formatColumns } from './format.ts';
import { withExamples } from './help-examples.ts';

/** `snapshift storage list`: which storage system and volume hold each VM disk. */
export function registerStorageCommands(program: Command): void {
  const storage = withExamples(program.command('storage').description('storage systems that hold VM disks'), 'snapshift storage list');
  withExamples(storage.command('list'), 'snapshift storage list', 'snapshift storage list vm1 vm2 --json')
    .description('show, for each disk of each registered VM, the storage system and volume that hold it')
    .argument('[vm...]', 'only these VMs')
    .option('--json', 'print the result as JSON')
    .action(async (vmNames: string[], options: { json?: boolean }, command: Command) => {
      using catalog = openCatalog(command);
      const vms = catalog.listVms().filter((vm) => vmNames.length === 0 || vmNames.includes(vm.name));
      const rows: Array<{ vm: string; disk: string; image: string; system: string | null; volume: string | null; error?: string }> = [];
      for (const record of vms) {
        try {
          const target = catalog.getVm(record.name);
          if (!target) throw new Error(`its host ${record.hostName} is not registered`);
          await using vm = await openVm(target, { timeoutMs: 5_000 });
          for (const disk of await vm.listDisks()) {
            const where = await locateImage(disk.imagePath);
            rows.push({ vm: record.name, disk: disk.name, image: disk.imagePath, system: where?.system.kind ?? null, volume: where?.volume.id ?? null });
          }
        } catch (error) {
          rows.push({ vm: record.name, disk: '-', image: '-', system: null, volume: null, error: (error as Error).message });
        }
      }
      if (options.json) return printJson(rows);
      console.log(formatColumns(['VM', 'DISK', 'IMAGE', 'SYSTEM', 'VOLUME'], rows.map((row) => [row.vm, row.disk, row.image, row.system ?? (row.error ? `error: ${row.error}` : 'none (regular mode only)'), row.volume ?? '-'])));
    });
}
