-- Personalised browse (pet_personalization) reads a customer's orders.
CREATE INDEX order_status_view_customer ON order_status_view ((document->>'customer_id'));
