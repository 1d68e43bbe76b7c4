"""The pickup process: moves local submissions (elemta-sendmail) from the maildrop into
the queue. See elemta.pickup.worker and elemta.queue.maildrop."""
