// The authority's home directory (online side) and the offline root directory.
//
//   <home>/hallmark.json   configuration (no secrets)
//   <home>/keys/           encrypted file key store (TLS key; CA keys with the file backend)
//   <home>/hallmark.db     SQLite store, unless HALLMARK_DATABASE_URL names PostgreSQL
//   <home>/tls/server.pem  TLS server certificate chain for `serve`
//   <home>/requests/       CSRs written by `ca request`
//
//   <root>/root.json       root CA description (no secrets)
//   <root>/root.pem        root certificate
//   <root>/keys/           encrypted key store holding the root key (file backend)
//   <root>/issued.jsonl    journal of every certificate the root signed

import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join, resolve, dirname } from 'node:path';
import { existsSync } from 'node:fs';
import { HallmarkError } from '../errors.js';
import type { KeyRef } from '../keys/key-backend.js';

export interface Pkcs11Settings { readonly module: string; readonly token: string }

export interface HomeConfig {
  readonly version: 1;
  readonly org: string;
  readonly createdAt: string;
  /** Set by `npm start` on a fresh clone: keys protected by a generated passphrase kept beside them. */
  readonly development: boolean;
  readonly keyBackend: { readonly kind: 'file' } | ({ readonly kind: 'pkcs11' } & Pkcs11Settings);
  defaultIssuer: string;
  tls: { readonly keyRef: KeyRef; readonly dnsNames: readonly string[]; readonly ipAddresses: readonly string[] };
  ocspSigners: Record<string, { readonly keyRef: KeyRef; readonly serial: string }>;
  /**
   * Where relying parties reach the public listener (http://pki.example.com:8080). When set, issued device
   * and TLS certificates carry CRL Distribution Points (PUBLIC/crl/CA.crl) and Authority Information Access
   * (OCSP: PUBLIC/ocsp; CA issuers: PUBLIC/ca/CA.crt).
   */
  publicUrl?: string;
}

/** Checks a public base URL: http(s), a host, no query or fragment; returned without a trailing slash. */
export function checkPublicUrl(text: string): string {
  let u: URL;
  try { u = new URL(text); } catch { throw new HallmarkError('BAD_REQUEST', `--public-url is not a URL: ${JSON.stringify(text)}`); }
  if (!['http:', 'https:'].includes(u.protocol) || !u.hostname || u.search || u.hash || u.username || u.password) {
    throw new HallmarkError('BAD_REQUEST', `--public-url must be http(s)://HOST[:PORT][/PATH] without query, fragment or credentials: ${JSON.stringify(text)}`);
  }
  if (!/^[\x21-\x7e]+$/.test(u.href)) throw new HallmarkError('BAD_REQUEST', '--public-url must be plain ASCII');
  return u.href.replace(/\/+$/, '');
}

export interface RootConfig {
  readonly version: 1;
  readonly name: string;
  readonly subject: string;
  readonly keyRef: KeyRef;
  readonly pkcs11?: Pkcs11Settings;
  readonly createdAt: string;
}

export const HOME_FILES = {
  config: 'hallmark.json',
  keys: 'keys',
  database: 'hallmark.db',
  tlsChain: join('tls', 'server.pem'),
  requests: 'requests',
  devPassphrase: 'DEVELOPMENT-PASSPHRASE',
} as const;

export const ROOT_FILES = { config: 'root.json', certificate: 'root.pem', keys: 'keys', journal: 'issued.jsonl' } as const;

export function resolveHome(flag?: string): string {
  return resolve(flag ?? process.env.HALLMARK_HOME ?? './hallmark-data');
}

/** Default offline root directory: a sibling of the home, so it can be moved off the machine. */
export function defaultRootDir(home: string): string {
  return join(dirname(home), 'hallmark-root');
}

export function databaseUrl(home: string): string {
  return process.env.HALLMARK_DATABASE_URL || join(home, HOME_FILES.database);
}

export function isInitialised(home: string): boolean {
  return existsSync(join(home, HOME_FILES.config));
}

async function readJson<T>(path: string, missing: () => HallmarkError): Promise<T> {
  let text: string;
  try { text = await readFile(path, 'utf8'); } catch { throw missing(); }
  if (text.length > 1024 * 1024) throw new HallmarkError('BAD_REQUEST', `${path} is too large`);
  try { return JSON.parse(text) as T; } catch (err) { throw new HallmarkError('BAD_REQUEST', `${path} is not valid JSON`, { cause: err }); }
}

export async function writeJsonAtomic(path: string, value: unknown, mode = 0o600): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, JSON.stringify(value, null, 2) + '\n', { mode });
  await rename(tmp, path);
}

export async function loadHomeConfig(home: string): Promise<HomeConfig> {
  const cfg = await readJson<HomeConfig>(join(home, HOME_FILES.config), () => new HallmarkError('NOT_INITIALISED', `${home} holds no authority (run: hallmark init --home ${home} --org NAME)`));
  if (cfg.version !== 1) throw new HallmarkError('BAD_REQUEST', `unsupported configuration version ${String(cfg.version)} in ${home}`);
  return cfg;
}

export const saveHomeConfig = (home: string, cfg: HomeConfig): Promise<void> => writeJsonAtomic(join(home, HOME_FILES.config), cfg);

export async function loadRootConfig(rootDir: string): Promise<RootConfig> {
  const cfg = await readJson<RootConfig>(join(rootDir, ROOT_FILES.config), () => new HallmarkError('ROOT_DIR_INVALID', `${rootDir} is not a Hallmark root directory (no ${ROOT_FILES.config})`));
  if (cfg.version !== 1 || !cfg.keyRef) throw new HallmarkError('ROOT_DIR_INVALID', `${rootDir}/${ROOT_FILES.config} is not a root description`);
  return cfg;
}
