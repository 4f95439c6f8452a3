// `hallmark init`: creates an authority. The intermediate goes through the same ceremony steps an
// operator runs by hand (ca request -> root sign -> ca install), only in one process.

import { existsSync } from 'node:fs';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { appendAudit } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { FileKeyBackend } from '../keys/file-backend.js';
import type { KeyBackend } from '../keys/key-backend.js';
import { openPkcs11 } from '../keys/open-backend.js';
import { parseKeyAlgorithm, type KeyAlgorithm } from '../pki/algorithms.js';
import { generalNames, keyIdentifier } from '../pki/extensions.js';
import { nameToString } from '../pki/names.js';
import { encodePem } from '../pki/pem.js';
import { Store, nowIso } from '../store/database.js';
import { Authority } from './authority.js';
import { HOME_FILES, ROOT_FILES, checkPublicUrl, databaseUrl, saveHomeConfig, type HomeConfig, type Pkcs11Settings } from './home.js';
import { OfflineRoot } from './offline-root.js';

export interface InitOptions {
  readonly home: string;
  readonly rootDir: string;
  readonly org: string;
  readonly passphrase: string;
  /** Passphrase for the root directory's key store; the same as `passphrase` when absent. */
  readonly rootPassphrase?: string;
  readonly keyBackend: 'file' | 'pkcs11';
  readonly pkcs11?: Pkcs11Settings;
  /** Token for the root key; the CA token when absent. */
  readonly rootPkcs11Token?: string;
  readonly algorithm?: KeyAlgorithm | string;
  readonly issuingCaName?: string;
  readonly tlsDnsNames?: readonly string[];
  readonly tlsIpAddresses?: readonly string[];
  readonly development?: boolean;
  /** Base URL of the public listener, written into certificates (CRL and OCSP pointers). */
  readonly publicUrl?: string;
  readonly actor: string;
}

export interface InitResult {
  readonly home: string;
  readonly rootDir: string;
  readonly rootSubject: string;
  readonly issuingCa: string;
}

export async function initAuthority(options: InitOptions): Promise<InitResult> {
  // Validate everything before anything is created.
  const org = options.org?.trim();
  if (!org) throw new HallmarkError('BAD_REQUEST', '--org is required');
  if (/[,=+\\"<>;]/.test(org) || org.length > 64) throw new HallmarkError('BAD_REQUEST', '--org must be at most 64 characters, without , = + \\ " < > ;');
  if (!options.passphrase) throw new HallmarkError('PASSPHRASE_REQUIRED', 'a passphrase is required (HALLMARK_PASSPHRASE, --passphrase-file, or a terminal)');
  if (options.passphrase.length < 8) throw new HallmarkError('BAD_REQUEST', 'the passphrase must be at least 8 characters');
  const algorithm = parseKeyAlgorithm(options.algorithm ?? 'ecdsa-p256');
  if (options.keyBackend === 'pkcs11' && !options.pkcs11) throw new HallmarkError('BAD_REQUEST', '--key-backend pkcs11 needs --pkcs11-module and --pkcs11-token');
  if (existsSync(join(options.home, HOME_FILES.config))) throw new HallmarkError('ALREADY_INITIALISED', `${options.home} already holds an authority`);
  if (existsSync(join(options.rootDir, ROOT_FILES.config))) throw new HallmarkError('ALREADY_INITIALISED', `${options.rootDir} already holds a root CA`);
  const homeExisted = existsSync(options.home);
  const rootExisted = existsSync(options.rootDir);
  const issuingCaName = options.issuingCaName ?? 'issuing-1';
  generalNames({ dns: options.tlsDnsNames ?? [], ip: options.tlsIpAddresses ?? [] }); // throws BAD_REQUEST on a bad name

  let fileKeys: FileKeyBackend | undefined;
  let caKeys: KeyBackend | undefined;
  let root: OfflineRoot | undefined;
  let store: Store | undefined;
  let storeWasEmpty = false;
  try {
    await mkdir(options.home, { recursive: true, mode: 0o700 });
    fileKeys = await FileKeyBackend.create(join(options.home, HOME_FILES.keys), options.passphrase);
    caKeys = options.keyBackend === 'pkcs11' ? await openPkcs11(options.pkcs11!, options.passphrase) : fileKeys;

    root = await OfflineRoot.create({
      dir: options.rootDir,
      passphrase: options.rootPassphrase || options.passphrase,
      org,
      algorithm,
      pkcs11: options.keyBackend === 'pkcs11' ? { module: options.pkcs11!.module, token: options.rootPkcs11Token ?? options.pkcs11!.token } : undefined,
    });

    store = await Store.open({ url: databaseUrl(options.home) });
    const existing = await store.db.selectFrom('certificate_authorities').select('id').limit(1).executeTakeFirst();
    const existingAudit = await store.db.selectFrom('audit_log').select('seq').limit(1).executeTakeFirst();
    if (existing || existingAudit) throw new HallmarkError('ALREADY_INITIALISED', `the database ${store.describe()} already holds an authority`);
    storeWasEmpty = true;

    const tlsKey = await fileKeys.generateKey('hallmark-tls-server', 'ecdsa-p256');
    const config: HomeConfig = {
      version: 1,
      org,
      createdAt: nowIso(),
      development: !!options.development,
      keyBackend: options.keyBackend === 'pkcs11' ? { kind: 'pkcs11', ...options.pkcs11! } : { kind: 'file' },
      defaultIssuer: issuingCaName,
      tls: { keyRef: tlsKey, dnsNames: ['localhost', ...new Set([hostname().toLowerCase(), ...(options.tlsDnsNames ?? [])])].filter((d, i, a) => a.indexOf(d) === i), ipAddresses: ['127.0.0.1', '::1', ...(options.tlsIpAddresses ?? [])] },
      ocspSigners: {},
      ...(options.publicUrl ? { publicUrl: checkPublicUrl(options.publicUrl) } : {}),
    };

    const rootCert = root.certificate;
    await store.writeTransaction(async (trx) => {
      const now = nowIso();
      await trx.insertInto('certificate_authorities').values({
        name: 'root', role: 'root', parent_id: null, status: 'active', subject: nameToString(rootCert.subject), key_ref: null,
        key_algorithm: algorithm, ski: keyIdentifier(rootCert.subjectPublicKeyInfo).toString('hex'), path_len: null,
        certificate_der: rootCert.der, csr_der: null, serial: rootCert.serialHex.replace(/^00(?=.)/, ''), not_before: nowIso(rootCert.notBefore), not_after: nowIso(rootCert.notAfter),
        created_at: now, updated_at: now,
      }).execute();
      await appendAudit(trx, [
        { actor: options.actor, action: 'authority.init', target: org, details: { keyBackend: options.keyBackend, algorithm, development: !!options.development } },
        { actor: options.actor, action: 'ca.create', target: 'root', details: { subject: nameToString(rootCert.subject), serial: rootCert.serialHex, notAfter: nowIso(rootCert.notAfter), keyLocation: options.keyBackend === 'pkcs11' ? 'pkcs11' : 'root directory' } },
      ]);
    });

    const authority = Authority.fromParts(options.home, config, store, fileKeys, caKeys);
    const { csrPem } = await authority.requestCa({ name: issuingCaName, algorithm, actor: options.actor });
    const signed = await root.signIntermediate({ csr: csrPem, pathLen: 0 });
    await authority.installCa({ certificate: signed.der, actor: options.actor });

    const ocspRef = await caKeys.generateKey(`hallmark-ocsp-${issuingCaName}`, algorithm);
    const ocsp = await authority.issueForOwnKey({ signer: await caKeys.signer(ocspRef), profile: 'ocsp-signer', subject: `CN=${org} ${issuingCaName} OCSP Signer,O=${org}`, actor: options.actor });
    config.ocspSigners[issuingCaName] = { keyRef: ocspRef, serial: ocsp.serial };

    const tls = await authority.issueForOwnKey({
      signer: await fileKeys.signer(tlsKey), profile: 'tls-server', subject: `CN=${config.tls.dnsNames[0]},O=${org}`,
      altNames: { dns: config.tls.dnsNames, ip: config.tls.ipAddresses }, actor: options.actor,
    });
    await mkdir(join(options.home, 'tls'), { recursive: true });
    await writeFile(join(options.home, HOME_FILES.tlsChain), [tls.der, ...tls.chain.slice(0, -1)].map((d) => encodePem('CERTIFICATE', d)).join(''));

    await saveHomeConfig(options.home, config);
    return { home: options.home, rootDir: options.rootDir, rootSubject: nameToString(rootCert.subject), issuingCa: issuingCaName };
  } catch (err) {
    // Leave nothing half-made behind: a failed init changes nothing. The database was empty when
    // this init began (checked above), so what it holds now is this init's own partial work.
    if (store && storeWasEmpty) {
      const db = store.db;
      await db.transaction().execute(async (trx) => {
        for (const table of ['certificates', 'api_tokens', 'audit_log'] as const) await trx.deleteFrom(table).execute();
        await trx.updateTable('certificate_authorities').set({ parent_id: null }).execute();
        await trx.deleteFrom('certificate_authorities').execute();
      }).catch(() => {});
    }
    await store?.close().catch(() => {});
    store = undefined;
    if (!homeExisted) await rm(options.home, { recursive: true, force: true });
    else for (const f of [HOME_FILES.keys, HOME_FILES.database, `${HOME_FILES.database}-wal`, `${HOME_FILES.database}-shm`, 'tls', HOME_FILES.requests]) await rm(join(options.home, f), { recursive: true, force: true });
    if (!rootExisted) await rm(options.rootDir, { recursive: true, force: true });
    throw err;
  } finally {
    await root?.close().catch(() => {});
    if (caKeys && caKeys !== fileKeys) await caKeys.close().catch(() => {});
    await fileKeys?.close().catch(() => {});
    await store?.close().catch(() => {});
  }
}
