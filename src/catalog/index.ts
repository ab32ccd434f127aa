export * from './catalog.ts';
export * from './home.ts';
