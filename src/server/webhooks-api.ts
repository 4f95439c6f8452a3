// Webhook routes of the admin API (subscriptions, their deliveries, retry) and the expiry report.
// Parse and render only: src/events/webhooks.ts and src/authority/expiry.ts decide and persist.

import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { Authority } from '../authority/authority.js';
import { expiryReport } from '../authority/expiry.js';
import { WEBHOOK_EVENTS, WEBHOOK_ID_PATTERN, createWebhook, disableWebhook, listDeliveries, listWebhooks, retryDelivery, type DeliveryStatus } from '../events/webhooks.js';
import { HallmarkError } from '../errors.js';

const err = { type: 'object', properties: { error: { type: 'object', properties: { code: { type: 'string' }, message: { type: 'string' } } } } } as const;
const errors = { 400: err, 401: err, 403: err, 404: err, 409: err, 500: err, 503: err };
const actorOf = (request: FastifyRequest): string => `token:${request.principal?.tokenId ?? '?'}`;

const counts = { type: 'object', properties: { pending: { type: 'integer' }, delivered: { type: 'integer' }, failed: { type: 'integer' } } } as const;
const webhookSchema = {
  type: 'object',
  properties: {
    id: { type: 'string' }, url: { type: 'string' }, events: { type: 'array', items: { type: 'string' } }, status: { type: 'string', enum: ['active', 'disabled'] },
    createdBy: { type: 'string' }, createdAt: { type: 'string' }, disabledAt: { type: ['string', 'null'] }, deliveries: counts,
  },
} as const;
const deliverySchema = {
  type: 'object',
  properties: {
    id: { type: 'integer' }, webhook: { type: 'string' }, event: { type: 'string' }, auditSeq: { type: ['integer', 'null'] }, status: { type: 'string', enum: ['pending', 'delivered', 'failed'] },
    attempts: { type: 'integer' }, nextAttemptAt: { type: ['string', 'null'] }, lastStatus: { type: ['integer', 'null'] }, lastError: { type: ['string', 'null'] },
    createdAt: { type: 'string' }, deliveredAt: { type: ['string', 'null'] },
    payload: { type: 'object', description: 'the body as sent: {id, event, at, data}', additionalProperties: true },
  },
} as const;
const idParams = { type: 'object', properties: { id: { type: 'string', pattern: WEBHOOK_ID_PATTERN } }, required: ['id'] } as const;

const expiringDevice = {
  type: 'object',
  properties: {
    serial: { type: 'string' }, issuer: { type: 'string' }, profile: { type: 'string' }, notAfter: { type: 'string' }, daysLeft: { type: 'integer' },
    device: { type: 'string' }, serialNumber: { type: ['string', 'null'] }, deviceState: { type: 'string' }, tenant: { type: 'string' },
    product: { type: 'string' }, line: { type: 'string' }, batch: { type: 'string' },
  },
} as const;
const expiryReportSchema = {
  type: 'object',
  properties: {
    generatedAt: { type: 'string' }, within: { type: 'string' }, until: { type: 'string' }, total: { type: 'integer' }, devices: { type: 'integer' }, others: { type: 'integer' },
    groups: { type: 'array', items: { type: 'object', properties: { product: { type: 'string' }, line: { type: 'string' }, batch: { type: 'string' }, count: { type: 'integer' }, earliest: { type: 'string' }, certificates: { type: 'array', items: expiringDevice } } } },
    otherCertificates: { type: 'array', items: { type: 'object', properties: { serial: { type: 'string' }, issuer: { type: 'string' }, profile: { type: 'string' }, subject: { type: 'string' }, notAfter: { type: 'string' }, daysLeft: { type: 'integer' } } } },
    weeks: { type: 'array', description: 'counts per ISO week (Monday, UTC) from this week to the end of the window', items: { type: 'object', properties: { week: { type: 'string' }, devices: { type: 'integer' }, others: { type: 'integer' }, total: { type: 'integer' } } } },
    truncated: { type: 'boolean' },
  },
} as const;

export function registerWebhooksApi(app: FastifyInstance, authority: Authority): void {
  const store = authority.store;
  const read = { scope: 'webhooks:read' as const };
  const write = { scope: 'webhooks:write' as const };

  app.post<{ Body: { url: string; events: string[] } }>('/api/v1/webhooks', {
    config: write,
    schema: {
      summary: 'Subscribe a URL to events (the signing secret is in this response only)', tags: ['webhooks'],
      body: {
        type: 'object', additionalProperties: false, required: ['url', 'events'],
        properties: { url: { type: 'string', maxLength: 2048 }, events: { type: 'array', items: { type: 'string', enum: [...WEBHOOK_EVENTS] }, minItems: 1, maxItems: WEBHOOK_EVENTS.length } },
      },
      response: { 201: { type: 'object', properties: { id: { type: 'string' }, url: { type: 'string' }, events: { type: 'array', items: { type: 'string' } }, secret: { type: 'string' }, createdAt: { type: 'string' } } }, ...errors },
    },
  }, async (request, reply) => {
    const created = await createWebhook(store, { url: request.body.url, events: request.body.events, actor: actorOf(request) });
    return reply.status(201).header('cache-control', 'no-store').send(created);
  });

  app.get('/api/v1/webhooks', {
    config: read,
    schema: { summary: 'Webhooks with their delivery counts by status (never their secrets)', tags: ['webhooks'], response: { 200: { type: 'object', properties: { items: { type: 'array', items: webhookSchema } } }, ...errors } },
  }, async () => ({ items: await listWebhooks(store) }));

  app.post<{ Params: { id: string } }>('/api/v1/webhooks/:id/disable', {
    config: write,
    schema: { summary: 'Disable a webhook (its pending deliveries are marked failed)', tags: ['webhooks'], params: idParams, response: { 200: webhookSchema, ...errors } },
  }, async (request) => disableWebhook(store, request.params.id, actorOf(request)));

  app.get<{ Params: { id: string }; Querystring: { status?: DeliveryStatus; limit?: number; before?: number } }>('/api/v1/webhooks/:id/deliveries', {
    config: read,
    schema: {
      summary: 'Deliveries of a webhook, newest first (pass the last id as before for the next page)', tags: ['webhooks'], params: idParams,
      querystring: { type: 'object', additionalProperties: false, properties: { status: { type: 'string', enum: ['pending', 'delivered', 'failed'] }, limit: { type: 'integer', minimum: 1, maximum: 1000 }, before: { type: 'integer', minimum: 1 } } },
      response: { 200: { type: 'object', properties: { items: { type: 'array', items: deliverySchema } } }, ...errors },
    },
  }, async (request) => ({ items: await listDeliveries(store, { webhook: request.params.id, status: request.query.status, limit: request.query.limit, before: request.query.before }) }));

  app.post<{ Params: { id: string; delivery: number } }>('/api/v1/webhooks/:id/deliveries/:delivery/retry', {
    config: write,
    schema: {
      summary: 'Send a delivery again now, with a fresh series of attempts', tags: ['webhooks'],
      params: { type: 'object', properties: { id: { type: 'string', pattern: WEBHOOK_ID_PATTERN }, delivery: { type: 'integer', minimum: 1 } }, required: ['id', 'delivery'] },
      response: { 200: deliverySchema, ...errors },
    },
  }, async (request) => {
    const delivery = await listDeliveries(store, { webhook: request.params.id, before: request.params.delivery + 1, limit: 1 });
    if (delivery[0]?.id !== request.params.delivery) throw new HallmarkError('NOT_FOUND', `webhook ${request.params.id} has no delivery ${request.params.delivery}`);
    return retryDelivery(store, request.params.delivery);
  });

  app.get<{ Querystring: { within?: string; limit?: number } }>('/api/v1/expiry', {
    config: { scope: 'certificates:read' },
    schema: {
      summary: 'Valid certificates expiring within a window: device certificates by product / line / batch, others apart, counts per ISO week', tags: ['certificates'],
      querystring: { type: 'object', additionalProperties: false, properties: { within: { type: 'string', maxLength: 16, description: 'e.g. 30d (default), 2w, 90d' }, limit: { type: 'integer', minimum: 1, maximum: 100000, description: 'certificates listed (counts are complete); default 1000' } } },
      response: { 200: expiryReportSchema, ...errors },
    },
  }, async (request) => expiryReport(store, { within: request.query.within, limit: request.query.limit }));
}
