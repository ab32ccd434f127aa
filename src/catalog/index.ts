export * from './catalog.ts';
export * from './home.ts';
export * from './job-store.ts';
export * from './vm-name.ts';
export * from './catalog-sync.ts';
